"""Memory terms of a training run, computed from the config and the DiT's shapes before anything is loaded.

Every term is bytes. The parameter terms are exact (the model and the LoRA are built on the meta device and
their tensors counted in the dtypes the loader gives them). The activation terms come from measured
coefficients: the autograd graph of one block of our DiT saves about ``62 * dim + 8 * ffn_dim`` bytes per video
token (the same in fp32 and bf16 compute: the residual stream, norms and modulation are fp32) plus ``16 * dim``
bytes per text token, counted with saved-tensor hooks on the tiny model (``tests/test_estimate.py`` re-measures
it). Gradient checkpointing keeps only each block's fp32 input (``4 * dim`` bytes a token) and recomputes one
block at a time. ``PROCESS_BASE_BYTES`` (Python, torch and the libraries) was measured as the peak RSS of a
tiny CPU run minus its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

GiB = 1024**3
ACT_PER_TOKEN_DIM = 62
ACT_PER_TOKEN_FFN = 8
ACT_PER_TEXT_TOKEN_DIM = 16
PROCESS_BASE_BYTES = int(0.38 * GiB)
"""Python, torch and the libraries `train` imports: the peak RSS (``VmHWM``) of a tiny CPU run minus its tensors."""
FORKSERVER_BYTES = 100 * 1024**2
WORKER_BYTES = 70 * 1024**2
"""Data-loader workers: the forkserver they start from (Python, torch and the dataset code) and each worker, as
PSS (their shared pages counted once), measured at the 1.3B size with 2 workers (docs/benchmarks.md)."""
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
"""CUDA context and allocator slack on the GPU: a typical figure, not measured here."""
T5_PARAMS = 5_680_000_000
"""UMT5-XXL encoder parameters (models_t5_umt5-xxl-enc-bf16.pth holds 11.4 GB in bf16)."""
VAE_PARAMS = 127_000_000
_COMPUTE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
# optimiser state bytes per trainable fp32 parameter ("factored": Adafactor's row + column statistics)
_OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "adam8bit": 2, "lion": 4, "lion8bit": 1,
                    "prodigy": 16, "sgd": 4, "adafactor": "factored"}


@dataclass(frozen=True)
class Knobs:
    """The settings that move memory (a copy of the config's values; suggestions change them)."""

    compute: str
    fp8: bool
    fp8_scaled: bool
    blocks_to_swap: int
    gradient_checkpointing: bool
    cpu_offload: bool
    optimizer: str
    experts: int
    offload_inactive: bool
    separate_loras: bool
    tokens: int
    """Video tokens of the largest batch (batch size x latent frames x H/16 x W/16)."""
    batch: int
    device: str
    weight_dtype: str = "auto"
    """``dit_weight_dtype`` (older keys folded in): "bf16" / "fp16" / "fp32" set the block Linear bytes."""
    workers: int = 0
    """``max_data_loader_n_workers``."""
    release_freed_memory: bool = False
    allocator: str = "system"
    """``memory_allocator``: jemalloc / tcmalloc reuse freed step tensors (no slack term)."""

    def with_(self, **changes: Any) -> Knobs:
        return replace(self, **changes)


@dataclass
class Term:
    name: str
    vram: int = 0
    ram: int = 0
    note: str = ""


@dataclass
class Estimate:
    knobs: Knobs
    terms: list[Term] = field(default_factory=list)
    load_ram: int = 0
    """Peak RAM while the DiT is read: the tensors being built and the file pages of the one being read (the
    loader lets each tensor's pages go before the next)."""

    @property
    def vram(self) -> int:
        return sum(t.vram for t in self.terms) if self.knobs.device == "cuda" else 0

    @property
    def train_ram(self) -> int:
        """RAM while training (after the DiT is loaded)."""
        return sum(t.ram for t in self.terms)

    @property
    def ram(self) -> int:
        """Peak RSS: training, or loading when building the weights in RAM makes that higher."""
        return max(self.train_ram, self.load_ram)


@dataclass(frozen=True)
class ModelShapes:
    """Bytes and sizes of one DiT expert as the loader will hold it."""

    dim: int
    ffn_dim: int
    layers: int
    block_bytes: int
    other_bytes: int
    file_bytes: int
    lora_params: int
    lora_factored: int
    """Adafactor state elements of the LoRA (rows + columns of each matrix)."""
    name: str


def model_shapes(config: Any, network_cfg: Any, knobs: Knobs, file_bytes: int | None, name: str) -> ModelShapes:
    """Count the DiT and LoRA tensors on the meta device in the dtypes the loader would give them."""
    from ..models.wan.fp8 import is_fp8_block_linear
    from ..models.wan.loading import WEIGHT_DTYPES, _target_dtype
    from ..models.wan.transformer import WanModel
    from ..networks.lora_wan import create_network

    compute = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[knobs.compute]
    with torch.device("meta"):
        model = WanModel(config)
        network = create_network(network_cfg.model_copy(update={"network_weights": None}), model)
    block = other = stored = 0
    for key, tensor in model.state_dict().items():
        if knobs.fp8 and is_fp8_block_linear(key):
            size = tensor.numel() + (tensor.shape[0] * 4 if knobs.fp8_scaled else 0)
        elif knobs.weight_dtype in WEIGHT_DTYPES and is_fp8_block_linear(key):
            size = tensor.numel() * WEIGHT_DTYPES[knobs.weight_dtype].itemsize
        else:
            size = tensor.numel() * _target_dtype(key, torch.bfloat16, compute).itemsize
        stored += tensor.numel() * 2
        if key.startswith("blocks.0."):
            block += size
        elif not key.startswith("blocks."):
            other += size
    lora = [p for p in network.parameters()]
    factored = sum(sum(p.shape) if p.ndim == 2 else p.numel() for p in lora)
    return ModelShapes(config.dim, config.ffn_dim, config.num_layers, block, other,
                       file_bytes if file_bytes is not None else stored,
                       sum(p.numel() for p in lora), factored, name)


def _optimizer_bytes(shapes: ModelShapes, optimizer: str) -> tuple[int, str]:
    per = _OPTIMIZER_BYTES.get(optimizer.lower().rsplit(".", 1)[-1].lower())
    if per == "factored":
        return shapes.lora_factored * 4, "factored second moments"
    if per is None:
        return shapes.lora_params * 8, f"{optimizer}: unknown, counted as two fp32 states like AdamW"
    return shapes.lora_params * per, f"{per} bytes per parameter"


def estimate(shapes: ModelShapes, knobs: Knobs, text_tokens: int = 512) -> Estimate:
    """The training run's terms (VRAM on a CUDA device; with device "cpu" everything is RAM)."""
    est = Estimate(knobs)
    gpu = knobs.device == "cuda"
    swapped = min(knobs.blocks_to_swap, shapes.layers - 1)
    resident_blocks = shapes.layers - swapped + (1 if swapped else 0)  # one swapped block in flight
    dit_gpu = shapes.other_bytes + shapes.block_bytes * resident_blocks
    dit_bytes = shapes.other_bytes + shapes.block_bytes * shapes.layers
    on_gpu_experts = 1 if (knobs.offload_inactive or swapped) else knobs.experts
    add = est.terms.append
    if gpu:
        add(Term("DiT weights", vram=dit_gpu * on_gpu_experts, ram=shapes.block_bytes * swapped,
                 note=f"{shapes.name}, {shapes.layers - swapped} of {shapes.layers} blocks on the GPU"
                      + (f", {swapped} swapped (pinned in RAM)" if swapped else "")))
        if knobs.experts > on_gpu_experts:
            add(Term("inactive expert", ram=dit_bytes, note="the other Wan 2.2 expert waits in RAM"))
    else:
        add(Term("DiT weights", ram=dit_bytes * knobs.experts, note=f"{shapes.name}, in RAM"))
    networks = 2 if knobs.separate_loras else 1
    lora = shapes.lora_params * 4 * networks
    opt, opt_note = _optimizer_bytes(shapes, knobs.optimizer)
    place = "vram" if gpu else "ram"
    add(Term("LoRA weights + gradients", **{place: 2 * lora}, note=f"{shapes.lora_params / 1e6:.1f}M parameters, fp32"))
    add(Term("optimiser states", **{place: opt * networks}, note=opt_note))
    per_token = ACT_PER_TOKEN_DIM * shapes.dim + ACT_PER_TOKEN_FFN * shapes.ffn_dim
    one_block = knobs.tokens * per_token + knobs.batch * text_tokens * ACT_PER_TEXT_TOKEN_DIM * shapes.dim
    inputs = knobs.tokens * shapes.dim * 4 * shapes.layers
    edges = knobs.tokens * shapes.dim * 4 * 4  # patch embedding, head, loss
    if not knobs.gradient_checkpointing:
        add(Term("activations", **{place: one_block * shapes.layers + edges},
                 note=f"{knobs.tokens} tokens, every block's saved tensors"))
    elif knobs.cpu_offload and gpu:
        add(Term("activations", vram=one_block + edges, ram=inputs,
                 note=f"{knobs.tokens} tokens, checkpointed; block inputs in RAM, one block recomputed"))
    else:
        add(Term("activations", **{place: inputs + one_block + edges},
                 note=f"{knobs.tokens} tokens, checkpointed: block inputs + one block recomputed"))
    if gpu:
        add(Term("CUDA context + allocator", vram=CUDA_CONTEXT_BYTES, note="typical, not measured here"))
    add(Term("process (Python, torch, libraries)", ram=PROCESS_BASE_BYTES, note="measured on the CPU"))
    if not gpu and not knobs.release_freed_memory and knobs.allocator == "system":
        add(Term("allocator slack (not counted)", note="glibc keeps freed step tensors: +1.1-1.3 GiB measured at 1.3B, "
                 "256 tokens; memory_allocator = \"jemalloc\" reuses them (same speed), release_freed_memory = "
                 "true returns them (slower steps)"))
    if knobs.workers:
        add(Term("data-loader workers", ram=FORKSERVER_BYTES + WORKER_BYTES * knobs.workers,
                 note=f"{knobs.workers} worker(s) and their forkserver, measured on the CPU"))
    # a single expert without block swap is read straight onto the GPU; otherwise every expert is built in RAM
    direct = gpu and knobs.experts == 1 and not swapped
    largest = 4 * shapes.dim * shapes.ffn_dim  # the largest tensor (an ffn weight), fp32 at most in the file
    est.load_ram = PROCESS_BASE_BYTES + largest + (0 if direct else dit_bytes * knobs.experts)
    return est


def caching_terms(model_cfg: Any, cache_cfg: Any, device: str) -> list[Term]:
    """The encoders of cache-latents / cache-text (weights; run before training, never with it)."""
    t5_path = Path(model_cfg.t5) if model_cfg.t5 is not None else None
    t5 = t5_path.stat().st_size if t5_path is not None and t5_path.is_file() else T5_PARAMS * 2
    if cache_cfg.text_encoder_cache.fp8_t5:
        t5 //= 2
    vae = VAE_PARAMS * (2 if device == "cuda" else 4)
    gpu = device == "cuda"
    return [Term("cache-text: UMT5 encoder", vram=t5 if gpu else 0, ram=t5 + PROCESS_BASE_BYTES,
                 note="fp8" if cache_cfg.text_encoder_cache.fp8_t5 else "bf16"),
            Term("cache-latents: Wan VAE", vram=vae if gpu else 0, ram=vae + PROCESS_BASE_BYTES,
                 note="weights only; frames are encoded in chunks of 4 (activations not modelled)")]


__all__ = ["GiB", "Estimate", "Knobs", "ModelShapes", "Term", "caching_terms", "estimate", "model_shapes"]
