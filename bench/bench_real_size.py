"""Speed and memory of training at a released DiT size, one run per storage mode, side by side.

    .venv/bin/python bench/bench_real_size.py [--size 1.3b] [--modes fp32,bf16,fp8] [--resolution 256x256]
        [--frames 1] [--steps 3] [--warmup 1] [--rank 16] [--threads 2] [--workers 2] [--dir D] [--json out.json]

Writes (once, kept in ``--dir``) a DiT of the released shape with random bf16 weights, streamed tensor by tensor,
and ``--items`` latent / text caches of the chosen resolution and frame count written directly (random tensors in
the cache format; no VAE or text encoder runs). Then, for each mode, a fresh child process trains a LoRA
(AdamW, gradient checkpointing, ``mixed_precision = "no"`` on the CPU) and reports:

- load: wall time of building the trainer (DiT load, LoRA, optimiser) and the peak PSS of the process tree
  (the trainer and its data-loader workers, ``wantrainer.utils.memory.process_tree_pss``, sampled every 0.2 s);
- train: the peak process-tree PSS while training, the median s/step after ``--warmup`` steps, and the median
  bare forward + backward of the same model, LoRA and inputs, timed after each step in the same run
  (``bench_trainer.StepClock``: each bare pass replays the inputs of the step before it);
- the same per step in CPU time of the trainer process (all threads): steadier than wall time on a busy machine;
- ratios against the first mode (fp32 by default); the trainer step against the bare pass of the same inputs
  (noisy latents, timesteps, text) run right after it (geometric mean of the pairs: each pair shares the
  machine's load of its minute), and against the step's own forward + backward (the trainer's timings: data
  wait, optimiser, scheduler, metrics and handlers on top); below the table both over every step of the run,
  with a 95 % interval, and the step against the bare pass before it as an order check. A mode named twice runs
  twice.
- the C allocator the mode's process ran with (``*-jemalloc`` / ``*-tcmalloc`` modes set ``memory_allocator``
  and start the process with the library preloaded, as ``wantrainer train`` restarts itself).

A mode is a name and the config keys it sets (``MODES``); ``--set key=value`` adds keys to every mode, so more
modes (another engine's keys) are one line each. Needs about 12 GB of free RAM at 1.3B (fp32 weights 5.7 GB).
Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {"1.3b": "wan21_t2v_1.3b", "5b": "wan22_ti2v_5b", "14b": "wan21_t2v_14b", "tiny": None}
"""--size -> a released shape of ``models.wan.configs.WAN_CONFIGS`` (tiny: the kit's 2-block DiT). The 5B is the
Wan 2.2 TI2V-5B (48-channel latents of the Wan 2.2 VAE, 16x spatial; text-to-video items); its fp32 weights need
about 20 GiB, its bf16 ones 10 GiB."""

MODES: dict[str, dict[str, Any]] = {
    "fp32": {"dit_weight_dtype": "fp32"},
    "bf16": {"dit_weight_dtype": "bf16"},
    "fp16": {"dit_weight_dtype": "fp16"},
    "fp8": {"dit_weight_dtype": "fp8"},
    "fp8_scaled": {"dit_weight_dtype": "fp8_scaled"},
    "tread": {"tread_selection_ratio": 0.5},  # TREAD over the default middle span (blocks 2 .. -2)
    # freed blocks of 64 KiB and more returned to the system at once (utils.memory.release_freed_blocks)
    "fp32-release": {"dit_weight_dtype": "fp32", "release_freed_memory": True},
    "bf16-release": {"dit_weight_dtype": "bf16", "release_freed_memory": True},
    "fp8-release": {"dit_weight_dtype": "fp8", "release_freed_memory": True},
    # another C allocator preloaded into the mode's process (utils.allocator; the library must be installed)
    **{f"{dtype}-{name}": {"dit_weight_dtype": dtype, "memory_allocator": name}
       for dtype in ("fp32", "bf16", "fp8") for name in ("jemalloc", "tcmalloc")},
}
"""Mode name -> the config keys it sets on top of the base run."""

GiB = 1024**3
TEXT_TOKENS = 24


# ----- preparation (parent) ---------------------------------------------------------------------------------
def write_random_dit(path: Path, shape_name: str, seed: int = 0) -> None:
    """A DiT of a released shape with random bf16 weights (std 0.02; norms 1), written one tensor at a time."""
    from wantrainer.models.wan.configs import WAN_CONFIGS
    from wantrainer.models.wan.transformer import WanModel
    from wantrainer.utils.safetensors_stream import PlannedTensor, write_streamed

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(WAN_CONFIGS[shape_name]).state_dict().items()}
    planned = [PlannedTensor(k, torch.bfloat16, s) for k, s in shapes.items()]
    generator = torch.Generator().manual_seed(seed)

    def produce():
        for key, shape in shapes.items():
            if ".norm" in key and key.endswith("weight"):
                yield key, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield key, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    write_streamed(path, planned, produce)


def write_caches(media: Path, cache: Path, width: int, height: int, frames: int, items: int, text_dim: int,
                 seed: int = 0, model_type: str = "t2v") -> None:  # fmt: skip
    """``items`` images (frames == 1) or clips with their latent and text caches written directly, in the latent
    space of ``model_type`` (TI2V-5B: the Wan 2.2 VAE's)."""
    import numpy as np
    from PIL import Image

    from wantrainer.dataset.cache_format import (
        latent_cache_name,  # fmt: skip
        latent_shape,
        save_latent_cache,
        save_text_cache,
        text_cache_name,
    )
    from wantrainer.devkit.synthetic import write_mp4
    from wantrainer.models.wan.latent_space import latent_space

    space = latent_space(model_type)
    media.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    for index in range(items):
        stem = f"item{index:03d}"
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        if frames == 1:
            Image.fromarray(pixels).save(media / f"{stem}.png")
            name = latent_cache_name(stem, width, height)
        else:
            write_mp4(media / f"{stem}.mp4", [pixels] * frames)
            name = latent_cache_name(stem, width, height, 0, frames)
        f, h, w = latent_shape(width, height, None if frames == 1 else frames, space.spatial_stride)
        latents = torch.randn(space.channels, f, h, w, generator=generator).to(torch.bfloat16)
        save_latent_cache(cache / name, latents, width, height, None if frames == 1 else frames,
                          model_type=model_type, vae_type=space.vae_type)
        save_text_cache(cache / text_cache_name(stem), torch.randn(TEXT_TOKENS, text_dim, generator=generator)
                        .to(torch.bfloat16), caption=f"item {index}")  # fmt: skip
        (media / f"{stem}.txt").write_text(f"item {index}", encoding="utf-8")


def prepare(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The base config values (files written once, reused when they exist)."""
    from wantrainer.devkit.tiny_kit import make_tiny_model_kit

    width, height = args.resolution
    shape_name = SIZES[args.size]
    model_type = "ti2v" if shape_name == "wan22_ti2v_5b" else "t2v"
    if shape_name is None:
        kit = make_tiny_model_kit(root / "kit", seed=0)
        dit, text_dim = kit.dit_wan21, 64
    else:
        from wantrainer.models.wan.configs import WAN_CONFIGS

        dit, text_dim = root / f"{shape_name}_random_bf16.safetensors", WAN_CONFIGS[shape_name].text_dim
        if not dit.is_file():
            print(f"writing {dit} ...", flush=True)
            write_random_dit(dit, shape_name)
    tag = f"{width}x{height}x{args.frames}_{args.items}_{text_dim}" + ("_ti2v" if model_type == "ti2v" else "")
    media, cache = root / f"media_{tag}", root / f"cache_{tag}"
    if not cache.is_dir():
        write_caches(media, cache, width, height, args.frames, args.items, text_dim, model_type=model_type)
    dataset: dict[str, Any] = {"cache_directory": str(cache), "resolution": [width, height], "batch_size": 1}
    if args.frames == 1:
        dataset["image_directory"] = str(media)
    else:
        dataset.update(video_directory=str(media), target_frames=[args.frames], frame_extraction="head")
    values: dict[str, Any] = {
        "dit": str(dit), "mixed_precision": "no" if args.device == "cpu" else "bf16", "seed": 1,
        "network_dim": args.rank, "network_alpha": float(args.rank), "learning_rate": 1e-4,
        "gradient_checkpointing": True, "max_data_loader_n_workers": args.workers,
        "persistent_data_loader_workers": args.workers > 0, "log_with": "none", "timestep_sampling": "uniform",
        "output_dir": str(root / "out"), "output_name": "bench", "datasets": {"train": [dataset]},
    }  # fmt: skip
    if model_type == "ti2v":
        values.update(target_model="wan22", ti2v_image_ratio=0.0)  # text-to-video items: no image to condition
    for item in args.set:
        key, _, text = item.partition("=")
        values[key] = json.loads(text) if text[:1] in "[{0123456789-tf\"" and text not in ("-",) else text
    return values


# ----- one mode (child) -------------------------------------------------------------------------------------
class MemorySampler(threading.Thread):
    """Samples the process-tree PSS every ``interval`` s; the maximum per phase."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "load"
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        from wantrainer.utils.memory import process_tree_pss

        value = process_tree_pss() or 0
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def cpu_clock() -> Any:
    """``bench_trainer.StepClock`` that also records this process's CPU time (all threads) of each step (on a
    machine busy with other work it moves less than the wall time) and the step's own forward + backward."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_trainer import StepClock

    class CpuStepClock(StepClock):
        def __init__(self) -> None:
            super().__init__()
            self.cpus: list[float] = []
            self.model_s: list[float] = []  # the step's own forward + backward (trainer timings)
            self._last_cpu = 0.0

        def on_train_start(self, trainer) -> None:
            super().on_train_start(trainer)
            self._last_cpu = time.process_time()

        def on_step_end(self, trainer) -> None:
            self.cpus.append(time.process_time() - self._last_cpu)
            timings = trainer.last_step.timings
            self.model_s.append(timings["forward"] + timings["backward"])
            super().on_step_end(trainer)  # the step's wall time and data wait, then the bare pass
            self._last_cpu = time.process_time()

    return CpuStepClock()


def run_mode(config: Path, steps: int, warmup: int, device: str) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_trainer import for_benchmark
    from wantrainer.config_parser import load_config
    from wantrainer.core.wan_network_trainer import build_trainer
    from wantrainer.utils.allocator import loaded_allocator
    from wantrainer.utils.memory import peak_rss_bytes

    sampler = MemorySampler()
    sampler.start()
    cfg = for_benchmark(load_config(config), warmup + steps, config.parent / "run")
    clock = cpu_clock()
    start = time.perf_counter()
    trainer = build_trainer(cfg, extra_handlers=[clock])
    load_s = time.perf_counter() - start
    sampler.sample()
    load_hwm = peak_rss_bytes()
    sampler.phase = "train"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    sampler.stop()
    walls, bare = clock.walls[warmup:], clock.bare_times[warmup:]
    result = {
        "load_s": load_s, "load_pss": sampler.peaks.get("load", 0), "train_pss": sampler.peaks.get("train", 0),
        "load_vmhwm": load_hwm, "step_s": statistics.median(walls), "bare_s": statistics.median(bare),
        "step_cpu_s": statistics.median(clock.cpus[warmup:]),
        "steps": len(walls), "tokens": int(clock.bare.inputs[0][0, 0].numel() // 4),
        "walls": walls, "bares": bare,
        "model_s": clock.model_s[warmup:], "allocator": loaded_allocator() or "system",
    }  # fmt: skip
    if device == "cuda":
        result.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved())
    return result


def run_child(mode: str, values: dict[str, Any], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    from wantrainer.config.toml_writer import dump_toml

    folder = root / f"mode_{mode}"
    shutil.rmtree(folder, ignore_errors=True)  # a rerun starts clean (the run folder refuses earlier saves)
    folder.mkdir(parents=True)
    config = folder / "bench.toml"
    keys = MODES[mode]
    config.write_text(dump_toml({**values, **keys, "output_dir": str(folder / "out")}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if keys.get("memory_allocator", "system") != "system":  # as `wantrainer train` restarts itself with it
        from wantrainer.utils.allocator import preload_environment

        env = preload_environment(keys["memory_allocator"], env)
    command = [sys.executable, __file__, "--child", str(config), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--threads", str(args.threads), "--device", args.device]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"mode {mode} failed:\n{done.stderr[-4000:]}")
    line = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


# ----- report -----------------------------------------------------------------------------------------------
def paired_ratio(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Geometric mean of a / b over (a, b) pairs measured side by side, with its 95 % interval (t quantile ~2 for
    the sample sizes here; the interval is (nan, nan) for one pair)."""
    logs = [math.log(a / b) for a, b in pairs]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    half = 2.0 * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def report(results: dict[str, dict[str, Any]], header: str) -> str:
    """The table of every mode against the first; below it, the trainer's overhead over all modes' pairs."""
    ref_name = next(iter(results))
    ref = results[ref_name]
    lines = [header, "",
             f"| mode | allocator | load s | peak PSS load GiB | peak PSS train GiB | s/step | bare fwd+bwd s | "
             f"step / bare (paired) | step / own fwd+bwd | CPU s/step | load peak / {ref_name} | "
             f"train peak / {ref_name} | s/step / {ref_name} | CPU s/step / {ref_name} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in results.items():
        paired = paired_ratio(list(zip(r["walls"], r["bares"])))[0]
        own = statistics.median(w / m for w, m in zip(r["walls"], r["model_s"]))
        lines.append(
            f"| {mode} | {r['allocator']} | {r['load_s']:.1f} | {r['load_pss'] / GiB:.2f} | "
            f"{r['train_pss'] / GiB:.2f} | {r['step_s']:.2f} | {r['bare_s']:.2f} | {paired:.3f} | {own:.3f} | "
            f"{r['step_cpu_s']:.2f} | {r['load_pss'] / ref['load_pss']:.2f} | "
            f"{r['train_pss'] / ref['train_pss']:.2f} | {r['step_s'] / ref['step_s']:.2f} | "
            f"{r['step_cpu_s'] / ref['step_cpu_s']:.2f} |")  # fmt: skip
    pairs = [pair for r in results.values() for pair in zip(r["walls"], r["bares"])]
    before = paired_ratio([pair for r in results.values() for pair in zip(r["walls"][1:], r["bares"][:-1])])[0]
    mean, low, high = paired_ratio(pairs)
    own_all = [w / m for r in results.values() for w, m in zip(r["walls"], r["model_s"])]
    lines += ["", f"trainer step / bare forward+backward of its inputs run right after it, all {len(pairs)} steps: "
              f"{mean:.3f} (95 % interval {low:.3f}-{high:.3f}; against the bare pass before each step, of the "
              f"previous step's inputs: {before:.3f}); trainer step / its own forward+backward: median "
              f"{statistics.median(own_all):.3f}, max {max(own_all):.3f}"]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--modes", default="fp32,bf16,fp8", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--resolution", default="256x256", type=lambda t: tuple(int(v) for v in t.split("x")))
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (default 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--set", action="append", default=[], help="key=value added to every mode's config")
    parser.add_argument("--dir", default=None, help="working folder, kept for reruns (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--prepare-only", action="store_true", help="write the checkpoint and caches, run nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_mode(Path(args.child), args.steps, args.warmup, args.device)), flush=True)
        return {}
    import tempfile

    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_real_size_"))
    root.mkdir(parents=True, exist_ok=True)
    values = prepare(root, args)
    if args.prepare_only:
        print(f"prepared {root}")
        return {}
    results = {}
    for mode in args.modes.split(","):  # a mode named twice runs twice (run-to-run spread)
        label = mode if mode not in results else f"{mode} (run {sum(k.split()[0] == mode for k in results) + 1})"
        print(f"mode {label} ...", flush=True)
        results[label] = run_child(mode, values, root, args)
        print(f"  {results[label]}", flush=True)
    width, height = args.resolution
    header = (f"size {args.size}, {width}x{height} x {args.frames} frame(s), LoRA rank {args.rank}, AdamW, gradient "
              f"checkpointing, {args.threads} threads, {args.workers} workers, {args.device}; median of {args.steps} "
              f"steps after {args.warmup} warm-up")  # fmt: skip
    if args.device == "cpu":
        from wantrainer.models.wan import cpu_kernels

        reason = cpu_kernels.unavailable_reason()
        header += "; CPU fp8 upcast: " + ("the C kernel" if reason is None else f"torch operations ({reason})")
    print(report(results, header))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
