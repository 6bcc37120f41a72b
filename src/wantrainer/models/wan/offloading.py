"""Block swap: keep N DiT blocks on the CPU and bring each to the compute device just ahead of its use.

Schedule, with L blocks of which N (1 <= N <= L - 1) are swapped, so that L - N blocks are resident:

* before a forward pass blocks ``0 .. L-N-1`` are on the device, ``L-N .. L-1`` on the CPU;
* forward: after block ``i < N`` has run it goes to the CPU and block ``L-N+i`` comes in (needed later);
* backward (blocks run in reverse): after block ``L-1-k`` (k < N) has finished its backward it goes to the CPU and
  block ``N-1-k`` comes in. At the end every block is back where the next forward starts.

Before a block runs (forward, or backward with its recomputation) the swapper waits for its move. On CUDA the moves
run on a side stream and are awaited with events, so they overlap with compute; elsewhere they are synchronous.
Only the block's own parameters and buffers move: a LoRA that wraps a Linear ``forward`` keeps its parameters
(which are not children of the block) on the compute device. Every move is recorded in ``moves`` (cleared at the
start of each forward) as ``(phase, action, block)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wantrainer.common.logger import get_logger
from wantrainer.errors import UserError

logger = get_logger(__name__)

TO_DEVICE, TO_CPU = "to_device", "to_cpu"


class _BackwardCallback(torch.autograd.Function):
    """Identity whose backward calls ``callback`` (when the gradient reaches this point of the graph)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, callback) -> torch.Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback()
        return grad, None


class BlockSwapper:
    """Moves ``num_swap`` of ``blocks`` between the CPU and ``device`` around each block's use."""

    def __init__(self, blocks: nn.ModuleList, num_swap: int, device: torch.device):
        num_blocks = len(blocks)
        if not 1 <= num_swap <= num_blocks - 1:
            raise UserError(
                f"blocks_to_swap = {num_swap} is out of range: this DiT has {num_blocks} blocks, so use 1 to "
                f"{num_blocks - 1} (at least one block must stay on the GPU), or 0 to disable block swap."
            )
        self.blocks = blocks
        self.num_swap = num_swap
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._events: dict[int, torch.cuda.Event] = {}
        self._on_device = [self._first_tensor_device(b) == self.device or not self.cuda for b in blocks]
        self.moves: list[tuple[str, str, int]] = []
        self.bytes_moved = 0  # since the start of the last forward

    @property
    def num_resident(self) -> int:
        return len(self.blocks) - self.num_swap

    # ----- hooks called by the model ------------------------------------------------------------------------
    def prepare_before_forward(self, force: bool = False) -> None:
        """Clear the move log and put each block where a forward starts (``force``: move every block)."""
        self.moves = []
        self.bytes_moved = 0
        for index in range(len(self.blocks)):
            want_device = index < self.num_resident
            if force or self._on_device[index] != want_device:
                self._move(index, want_device, "prepare", asynchronous=False)

    def before_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Wait until block ``index`` is on the device; mark its input for the backward schedule."""
        self._wait(index, "forward")
        if torch.is_grad_enabled() and h.requires_grad:
            h = _BackwardCallback.apply(h, lambda: self._after_backward(index))
        return h

    def after_block(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Forward schedule after block ``index``; mark its output so backward waits for the block first."""
        if index < self.num_swap:
            self._move(index, False, "forward")
            self._move(self.num_resident + index, True, "forward")
        if torch.is_grad_enabled() and h.requires_grad:
            h = _BackwardCallback.apply(h, lambda: self._wait(index, "backward"))
        return h

    def remove(self) -> None:
        """Finish pending moves (the blocks stay where they are)."""
        for index in list(self._events):
            self._wait(index, "remove")

    # ----- internals ----------------------------------------------------------------------------------------
    def _after_backward(self, index: int) -> None:
        done = len(self.blocks) - 1 - index  # blocks whose backward finished before this one
        if done < self.num_swap:
            self._move(index, False, "backward")
            self._move(self.num_swap - 1 - done, True, "backward")

    def _wait(self, index: int, phase: str) -> None:
        event = self._events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if not self._on_device[index]:  # not scheduled (e.g. a part of the graph without gradients)
            logger.debug("block %d was not prefetched (%s); moving it now", index, phase)
            self._move(index, True, phase, asynchronous=False)

    def _move(self, index: int, to_device: bool, phase: str, asynchronous: bool = True) -> None:
        block = self.blocks[index]
        if self.cuda and asynchronous:
            main = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(main)  # the block's last use has been issued on the main stream
            with torch.cuda.stream(self._stream):
                nbytes = move_block_tensors(
                    block, self.device if to_device else torch.device("cpu"), main, self._stream
                )
                event = torch.cuda.Event()
                event.record(self._stream)
            self._events[index] = event
        else:
            pending = self._events.pop(index, None)
            if pending is not None:  # an asynchronous move of this block must land before a synchronous one
                pending.synchronize()
            nbytes = move_block_tensors(block, self.device if to_device else torch.device("cpu"), None, None)
        self._on_device[index] = to_device
        self.moves.append((phase, TO_DEVICE if to_device else TO_CPU, index))
        self.bytes_moved += nbytes

    @staticmethod
    def _first_tensor_device(block: nn.Module) -> torch.device | None:
        tensor = next(iter(block.parameters()), None)
        return tensor.device if tensor is not None else None


def _copy_to(tensor: torch.Tensor, target: torch.device, streams) -> torch.Tensor:
    if tensor.device == target:
        return tensor
    if streams is None:
        return tensor.to(target)
    main, side = streams
    if target.type == "cpu":
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor, non_blocking=True)
        tensor.record_stream(side)  # the source must not be reused before the copy on `side` is done
    else:
        out = tensor.to(target, non_blocking=True)
        out.record_stream(main)  # allocated on `side`, used (and later freed) on the main stream
    return out


def move_block_tensors(block: nn.Module, target: torch.device, main, side) -> int:
    """Move the parameters (and their grads) and buffers owned by ``block`` to ``target`` in place.

    Returns the number of bytes of the block's tensors (whether or not they had to be copied).
    """
    streams = (main, side) if main is not None else None
    nbytes = 0
    for module in block.modules():
        for param in module._parameters.values():
            if param is None:
                continue
            nbytes += param.nbytes
            param.data = _copy_to(param.data, target, streams)
            if param.grad is not None:
                param.grad = _copy_to(param.grad, target, streams)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                nbytes += buffer.nbytes
                module._buffers[name] = _copy_to(buffer, target, streams)
    return nbytes
