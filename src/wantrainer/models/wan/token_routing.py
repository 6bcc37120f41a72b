"""TREAD token routing: during training a random share of the video tokens skips a span of DiT blocks.

At the first block of the span (``start_block``) each sample keeps a random subset of its tokens; only those run
through the blocks of the span, each with its own original 3-D RoPE position (the rows of the full sequence's
cos / sin tables) and, for per-token timesteps (TI2V), its own time modulation. After the last block of the span
(``end_block``, inclusive) the kept tokens are written back into their places in the sequence that entered the
span, so the routed tokens rejoin unchanged and every later block and the head see the full sequence. The text
context and the cross-attention are untouched.

Routing happens only in a training forward pass (``model.training`` and autograd on): validation, sampling and
anything under ``torch.no_grad()`` / ``model.eval()`` run the full sequence. The subset is drawn with
``torch.rand`` from the process-wide generator of the token's device, which the trainer swaps for its own seeded
model stream (``core.state.RandomStream``) during the forward pass, so a resumed run draws the same subsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wantrainer.errors import UserError


@dataclass(frozen=True)
class TokenRoute:
    """One routing span: ``selection_ratio`` of the tokens skip blocks ``start_block .. end_block`` (inclusive)."""

    selection_ratio: float
    start_block: int
    end_block: int

    @classmethod
    def from_keys(cls, selection_ratio: float, start: int, end: int, num_layers: int) -> TokenRoute | None:
        """The route the ``tread_*`` keys describe for a DiT of ``num_layers`` blocks (negative block indices
        count from the end: -1 is the last block); None when ``selection_ratio`` is 0 (routing off)."""
        if selection_ratio == 0:
            return None
        if not 0 < selection_ratio < 1:
            raise UserError(f"`tread_selection_ratio` = {selection_ratio}: use a value in [0, 1) (0 = off)")
        first, last = (i + num_layers if i < 0 else i for i in (start, end))
        if not (0 <= first <= last < num_layers):
            raise UserError(
                f"`tread_start_layer_idx` = {start}, `tread_end_layer_idx` = {end} give blocks {first}..{last}, "
                f"which is not a span of this DiT's {num_layers} blocks (0..{num_layers - 1}; negative indices count "
                "from the end, the end is included): use e.g. 2 and -2"
            )
        return cls(float(selection_ratio), first, last)

    def kept_count(self, seq_len: int) -> int:
        """Tokens that run through the span (at least one)."""
        return max(1, seq_len - int(round(seq_len * self.selection_ratio)))

    def choose(self, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """[B, K] long: the kept token indices of each sample, ascending (a uniform random subset)."""
        scores = torch.rand(batch, seq_len, device=device)
        keep = scores.argsort(dim=1)[:, : self.kept_count(seq_len)]
        return keep.sort(dim=1).values


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] -> [B, K, ...] at the indices ``keep`` [B, K]."""
    keep = keep.to(x.device)
    rows = torch.arange(keep.shape[0], device=x.device)[:, None]  # [B, 1]
    return x[rows, keep]


def scatter_tokens(full: torch.Tensor, routed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Write ``routed`` [B, K, dim] back into ``full`` [B, L, dim] at ``keep`` [B, K] (out of place)."""
    keep = keep.to(full.device)
    index = keep.unsqueeze(-1).expand(*keep.shape, full.shape[-1])
    return full.scatter(1, index, routed.to(full.device, full.dtype))


class RoutedSpan:
    """The state of one forward pass through a routed span (built at its start block, closed at its end)."""

    def __init__(self, route: TokenRoute, h: torch.Tensor, e0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.full = h
        self.keep = route.choose(h.shape[0], h.shape[1], cos.device)
        self.h = gather_tokens(h, self.keep)
        # per-token time modulation (TI2V: [B, L, 6, dim]) follows its tokens; a per-sample one is shared
        self.e0 = gather_tokens(e0, self.keep) if e0.ndim == 4 else e0
        # the RoPE tables [L, head_dim // 2] -> [B, K, head_dim // 2]: each kept token keeps its own position
        self.cos = cos[self.keep.to(cos.device)]
        self.sin = sin[self.keep.to(sin.device)]

    def close(self, routed: torch.Tensor) -> torch.Tensor:
        """The full sequence after the span: the routed tokens as they entered, the kept ones as processed."""
        return scatter_tokens(self.full, routed, self.keep)
