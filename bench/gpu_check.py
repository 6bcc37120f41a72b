"""One prepared check of training on a CUDA GPU (run by ``bench/gpu_check.sh``); ``--dry-run``: the same code paths
on the tiny model kit, on the CPU.

GPU run (under 8 minutes on one recent GPU): the Wan 2.1 1.3B shape with random bf16 weights, LoRA rank 32,
``mixed_precision = "bf16"``, sdpa, latent / text caches written directly at 832x480 x 81 frames (and 33), then:

1. bf16 at 81 and 33 frames (gradient checkpointing on);
2. ``dit_weight_dtype = "fp8_scaled"``, then with ``fp8_matmul`` (skipped below compute capability 8.9);
3. ``blocks_to_swap = 15``;
4. gradient checkpointing off at 33 frames (against 1.'s 33-frame row: on);
5. any extra rows of ``EXTRA_CHECKS`` whose config keys this build has (token routing, compiled blocks), else
   listed as skipped with the reason;
6. ``cache-latents`` on a few synthetic 81-frame clips (a random-weight VAE of the released shape);
7. a 4-step sample at 832x480 x 81 (random text embeddings).

Each training row: median s/step after one warm-up step, peak VRAM (``max_memory_allocated`` and reserved), and
the model FLOPs utilisation from counted FLOPs (``step_flops``) against the GPU's dense bf16 peak (``PEAK_TFLOPS``
by device name, or ``--peak-tflops``). Prints one table and writes it as JSON (``--out``).

``--dry-run`` runs every row on the CPU with the kit's 2-block DiT and VAE, at 64x64 with 9 / 5 frames standing for
81 / 33, fp32 compute, 2 steps, ``blocks_to_swap`` 1 (the kit has 2 blocks); rows that need CUDA are reported as
skipped with the reason. ``tests/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_size import write_caches, write_random_dit  # noqa: E402
from wantrainer.core.handlers.base import Handler  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "RTX 3090": 71.0, "A10": 125.0,
               "B200": 2250.0}  # fmt: skip
"""Dense bf16 tensor-core peak (TFLOP/s) by a part of the device name; the first match wins."""

EXTRA_CHECKS: list[tuple[str, dict[str, Any], str]] = [
    ("TREAD 0.5", {"tread_selection_ratio": 0.5}, "long"),
    ("compile_blocks", {"compile_blocks": True}, "long"),
]
"""(row name, config keys, clip) rows run only when the schema has the keys (features of other builds)."""


@dataclass
class Scale:
    """Sizes of a run: the GPU check or its dry run."""

    device: str
    dit: str | None  # a released shape name, None: the kit's DiT
    width: int
    height: int
    long_frames: int
    short_frames: int
    rank: int
    steps: int
    warmup: int
    swap: int
    precision: str
    cache_clips: int
    sample_steps: int = 4
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Row name -> keys this scale adds to the row (e.g. a TREAD span that fits the kit's 2 blocks)."""


GPU = Scale("cuda", "wan21_t2v_1.3b", 832, 480, 81, 33, 32, 3, 1, 15, "bf16", 3)
DRY = Scale("cpu", None, 64, 64, 9, 5, 4, 2, 1, 1, "no", 2,
            extra={"TREAD 0.5": {"tread_start_layer_idx": 1, "tread_end_layer_idx": 1}})


class StepTimer(Handler):
    """Wall time of each step (CUDA synchronised), and the peak VRAM after the warm-up steps."""

    name = "step_timer"

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last = 0.0

    def _now(self, trainer) -> float:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        return time.perf_counter()

    def on_train_start(self, trainer) -> None:
        self._last = self._now(trainer)

    def on_step_end(self, trainer) -> None:
        now = self._now(trainer)
        self.times.append(now - self._last)
        self._last = now


def step_flops(config: Any, tokens: int, text_len: int, checkpointing: bool) -> float:
    """FLOPs of one LoRA training step (batch 1), counted: matmuls of the block Linears (2 per multiply-add) and
    attention (QK^T and AV); the backward of a frozen Linear computes only the input gradient (1x its forward),
    attention's backward 2x; gradient checkpointing adds one more forward. LoRA, norms and the head are left out."""
    d, f, layers = config.dim, config.ffn_dim, config.num_layers
    linear = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * text_len * 2 * d * d  # self qkvo, cross q o, ffn; cross k v
    attention = 4 * tokens * tokens * d + 4 * tokens * text_len * d
    forward = layers * (linear + attention)
    backward = layers * (linear + 2 * attention)
    return forward * (2 if checkpointing else 1) + backward


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ----- preparation ------------------------------------------------------------------------------------------
def prepare(root: Path, scale: Scale) -> dict[str, Any]:
    """Base config values, the DiT / VAE files and the caches of both clip lengths."""
    from wantrainer.devkit.tiny_kit import make_tiny_model_kit

    kit = make_tiny_model_kit(root / "kit", seed=0)
    if scale.dit is None:
        dit, vae, text_dim = kit.dit_wan21, kit.vae, 64
    else:
        from wantrainer.models.wan.configs import WAN_CONFIGS

        dit, text_dim = root / f"{scale.dit}_random_bf16.safetensors", WAN_CONFIGS[scale.dit].text_dim
        if not dit.is_file():
            write_random_dit(dit, scale.dit)
        vae = root / "wan21_vae_random.safetensors"
        if not vae.is_file():
            write_random_vae(vae)
    datasets = {}
    for clip, frames in (("long", scale.long_frames), ("short", scale.short_frames)):
        media, cache = root / f"media_{clip}", root / f"cache_{clip}"
        if not cache.is_dir():
            write_caches(media, cache, scale.width, scale.height, frames, 1, text_dim)
        datasets[clip] = {"video_directory": str(media), "cache_directory": str(cache), "target_frames": [frames],
                          "frame_extraction": "head", "resolution": [scale.width, scale.height], "batch_size": 1}
    base = {"dit": str(dit), "vae": str(vae), "mixed_precision": scale.precision, "attn_mode": "sdpa", "seed": 1,
            "network_dim": scale.rank, "network_alpha": float(scale.rank), "learning_rate": 1e-4,
            "gradient_checkpointing": True, "max_data_loader_n_workers": 0, "log_with": "none",
            "timestep_sampling": "uniform", "output_name": "check"}  # fmt: skip
    return {"base": base, "datasets": datasets, "kit": kit, "text_dim": text_dim}


def write_random_vae(path: Path, seed: int = 0) -> None:
    """The released Wan 2.1 VAE shape (base width 96) with random weights, in the original key layout."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    from wantrainer.models.wan.vae import diffusers_to_original

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=96, z_dim=16)
    save_file({k: v.contiguous() for k, v in diffusers_to_original(model.state_dict()).items()}, str(path))


# ----- the rows ---------------------------------------------------------------------------------------------
def training_checks(scale: Scale) -> list[tuple[str, dict[str, Any], str, str | None]]:
    """(name, keys, clip, reason to skip or None) in the order they run."""
    from wantrainer.config_parser import all_flat_keys
    from wantrainer.models.wan.stored_linear import check_fp8_matmul_device

    keys = set(all_flat_keys())
    fp8_missing = check_fp8_matmul_device(scale.device)
    rows = [
        (f"bf16 x{scale.long_frames}" if scale.precision == "bf16" else f"fp32 x{scale.long_frames}", {}, "long", None),
        (f"{'bf16' if scale.precision == 'bf16' else 'fp32'} x{scale.short_frames} (GC on)", {}, "short", None),
        ("fp8_scaled", {"dit_weight_dtype": "fp8_scaled"}, "long", None),
        ("fp8_scaled + fp8_matmul", {"dit_weight_dtype": "fp8_scaled", "fp8_matmul": True}, "long", fp8_missing),
        (f"blocks_to_swap {scale.swap}", {"blocks_to_swap": scale.swap}, "long", None),
        (f"GC off x{scale.short_frames}", {"gradient_checkpointing": False}, "short", None),
    ]
    for name, values, clip in EXTRA_CHECKS:
        missing = sorted(set(values) - keys)
        values = {**values, **scale.extra.get(name, {})}
        skip = f"this build has no {', '.join(missing)}" if missing else None
        if scale.dit is None and "compile_blocks" in values and skip is None:
            skip = "not in the dry run (compiling takes minutes on the CPU; tests/test_compile_blocks.py runs it)"
        rows.append((name, values, clip, skip))
    return rows


def run_training(root: Path, prepared: dict[str, Any], name: str, values: dict[str, Any], clip: str,
                 scale: Scale, peak: float | None) -> dict[str, Any]:  # fmt: skip
    from wantrainer.config.toml_writer import dump_toml
    from wantrainer.config_parser import load_config
    from wantrainer.core.wan_network_trainer import build_trainer
    from wantrainer.models.wan.configs import WAN_CONFIGS
    from wantrainer.models.wan.loading import infer_wan_config, read_tensor_index

    folder = root / "runs" / "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(folder, ignore_errors=True)
    config = folder / "check.toml"
    folder.mkdir(parents=True)
    run_values = {**prepared["base"], **values, "max_train_steps": scale.warmup + scale.steps,
                  "output_dir": str(folder / "out"), "datasets": {"train": [prepared["datasets"][clip]]}}  # fmt: skip
    config.write_text(dump_toml(run_values), encoding="utf-8")
    cfg = load_config(config)
    device = torch.device(scale.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(scale.warmup)
    start = time.perf_counter()
    trainer = build_trainer(cfg, extra_handlers=[timer])
    load_s = time.perf_counter() - start
    trainer.train()
    step_s = statistics.median(timer.times[scale.warmup:])
    frames = scale.long_frames if clip == "long" else scale.short_frames
    tokens = ((frames - 1) // 4 + 1) * (scale.height // 16) * (scale.width // 16)
    model_config = WAN_CONFIGS[scale.dit] if scale.dit else infer_wan_config(
        {k: e.shape for k, e in read_tensor_index([Path(prepared["base"]["dit"])]).items()})  # fmt: skip
    flops = step_flops(model_config, tokens, 512, bool(run_values["gradient_checkpointing"]))
    row = {"row": name, "status": "ok", "frames": frames, "tokens": tokens, "load_s": round(load_s, 2),
           "s_per_step": round(step_s, 4), "tflop_per_step": round(flops / 1e12, 6)}  # fmt: skip
    row["mfu"] = round(flops / step_s / (peak * 1e12), 4) if peak else None
    if device.type == "cuda":
        row["max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["max_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    del trainer
    return row


def run_cache_latents(root: Path, prepared: dict[str, Any], scale: Scale) -> dict[str, Any]:
    """``cache-latents`` (the command's own code) on synthetic clips of the long frame count."""
    from wantrainer.caching.cache_latents import cache_latents
    from wantrainer.config.toml_writer import dump_toml
    from wantrainer.config_parser import load_config
    from wantrainer.devkit.synthetic import make_synthetic_dataset

    media = make_synthetic_dataset(root / "cache_check_media", seed=3, num_images=0, num_videos=scale.cache_clips,
                                   video_frames=(scale.long_frames, scale.long_frames)).video_dir  # fmt: skip
    cache = root / "cache_check"
    shutil.rmtree(cache, ignore_errors=True)
    values = {**prepared["base"], "output_dir": str(root / "cache_check_out"),
              "datasets": {"latent_cache": {"device": scale.device},
                           "train": [{"video_directory": str(media), "cache_directory": str(cache),
                                      "target_frames": [scale.long_frames], "frame_extraction": "head",
                                      "resolution": [scale.width, scale.height], "batch_size": 1}]}}  # fmt: skip
    config = root / "cache_check.toml"
    config.write_text(dump_toml(values), encoding="utf-8")
    if scale.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cache_latents(load_config(config))
    elapsed = time.perf_counter() - start
    written = len(list(cache.glob("*_wan.safetensors")))
    row = {"row": f"cache-latents {scale.cache_clips} clips x{scale.long_frames}", "status": "ok" if written else
           "failed: no cache written", "s_per_clip": round(elapsed / max(1, written), 3), "clips": written}  # fmt: skip
    if scale.device == "cuda":
        row["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return row


def run_sample(prepared: dict[str, Any], scale: Scale) -> dict[str, Any]:
    """A ``sample_steps``-step generation at the long clip size (random text embeddings), timed."""
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.sampling.generate import GenerationSettings, generate_latents
    from wantrainer.sampling.pipeline import compute_dtype, dit_model_fn

    device = torch.device(scale.device)
    dit = load_wan_dit(prepared["base"]["dit"], device=scale.device, dtype=compute_dtype(scale.precision, device))
    dit.eval().requires_grad_(False)
    settings = GenerationSettings(width=scale.width, height=scale.height, frames=scale.long_frames, seed=0,
                                  steps=scale.sample_steps, cfg_scale=5.0, flow_shift=3.0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(24, prepared["text_dim"], generator=generator)
    negative = torch.randn(8, prepared["text_dim"], generator=generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        latents = generate_latents(dit_model_fn(dit), context, negative, settings, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    row = {"row": f"sample {scale.sample_steps} steps x{scale.long_frames} (cfg)", "status":
           "ok" if torch.isfinite(latents).all() else "failed: non-finite latents", "s_total": round(elapsed, 3)}  # fmt: skip
    if device.type == "cuda":
        row["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del dit
    return row


def table(rows: list[dict[str, Any]], header: str) -> str:
    columns = ["row", "status", "s_per_step", "max_allocated_gib", "max_reserved_gib", "mfu", "tflop_per_step",
               "load_s", "s_per_clip", "s_total"]  # fmt: skip
    used = [c for c in columns if any(r.get(c) is not None for r in rows)]
    lines = [header, "", "| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in used) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same rows on the tiny kit, on the CPU")
    parser.add_argument("--out", default="bench_out/gpu_check", help="folder for the JSON table and work files")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args(argv)
    scale = DRY if args.dry_run else GPU
    if scale.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --dry-run to check the code paths on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    prepared = prepare(out / "work", scale)
    peak = peak_tflops(torch.device(scale.device), args.peak_tflops)
    rows: list[dict[str, Any]] = []
    for name, values, clip, skip in training_checks(scale):
        if skip is not None:
            rows.append({"row": name, "status": f"skipped: {skip}"})
            continue
        print(f"{name} ...", flush=True)
        try:
            rows.append(run_training(out / "work", prepared, name, values, clip, scale, peak))
        except Exception as exc:  # one failing row must not hide the others
            rows.append({"row": name, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
    for run in (lambda: run_cache_latents(out / "work", prepared, scale), lambda: run_sample(prepared, scale)):
        try:
            rows.append(run())
        except Exception as exc:
            rows.append({"row": "cache/sample", "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
    device = torch.cuda.get_device_name() if scale.device == "cuda" else "cpu (dry run, tiny kit)"
    header = (f"gpu_check on {device}: {'1.3B random weights' if scale.dit else 'tiny kit'}, {scale.width}x"
              f"{scale.height}, LoRA rank {scale.rank}, mixed_precision {scale.precision}, sdpa; median of "
              f"{scale.steps} steps after {scale.warmup} warm-up; peak {peak} TFLOP/s for MFU")  # fmt: skip
    text = table(rows, header)
    print(text)
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2), encoding="utf-8")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
