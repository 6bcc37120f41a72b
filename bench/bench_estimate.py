"""The RAM estimate of ``wantrainer estimate --device cpu`` against the measured peak RSS of a real CPU run.

    .venv/bin/python bench/bench_estimate.py [--size 1.3b|tiny] [--steps 2] [--dir D]

Writes a DiT of the released Wan 2.1 1.3B shape with random weights (bf16, 2.8 GB; kept in ``--dir`` for
reruns), a few 64x64 synthetic images cached with the tiny kit's VAE and random 4096-wide text caches, then
trains ``--steps`` steps on the CPU (fp32) in a child process and prints its peak RSS next to the estimate.
Needs about 12 GB of free RAM for 1.3B (check ``free -g``). Not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# The peak of this process's own memory (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's peak over
# into the child through vfork + exec (subprocess uses vfork), so a child of a 1 GB pytest reports >= 1 GB.
_MEASURE = """
import sys
from wantrainer.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("MAXRSS_KB", hwm.split()[1])
sys.exit(code)
"""


def write_random_dit(path: Path, name: str) -> None:
    from safetensors.torch import save_file

    from wantrainer.models.wan.configs import WAN_CONFIGS
    from wantrainer.models.wan.transformer import WanModel

    with torch.device("meta"):
        model = WanModel(WAN_CONFIGS[name])
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.02).to(torch.bfloat16)
             for k, v in model.state_dict().items()}
    save_file(state, str(path))


def prepare(root: Path, size: str) -> Path:
    from wantrainer.caching.cache_latents import cache_latents
    from wantrainer.config.toml_writer import dump_toml
    from wantrainer.config_parser import load_config
    from wantrainer.dataset.cache_format import save_text_cache, text_cache_name
    from wantrainer.devkit.synthetic import make_synthetic_dataset
    from wantrainer.devkit.tiny_kit import make_tiny_model_kit

    kit = make_tiny_model_kit(root / "kit", seed=0)
    media = make_synthetic_dataset(root / "media", seed=0, num_images=4, num_videos=0).image_dir
    dit = kit.dit_wan21
    if size == "1.3b":
        dit = root / "wan21_t2v_1.3b_random_bf16.safetensors"
        if not dit.is_file():
            write_random_dit(dit, "wan21_t2v_1.3b")
    cache = root / "cache"
    values = {"dit": str(dit), "vae": str(kit.vae), "mixed_precision": "no", "max_train_steps": 2, "seed": 1,
              "network_dim": 32, "network_alpha": 32.0, "max_data_loader_n_workers": 0, "log_with": "none",
              "output_dir": str(root / "out"), "output_name": "bench", "overwrite_output": True, "gradient_checkpointing": False,
              "datasets": {"train": [{"image_directory": str(media), "cache_directory": str(cache),
                                      "resolution": [64, 64], "batch_size": 1}]}}
    config = root / "bench.toml"
    config.write_text(dump_toml(values), encoding="utf-8")
    cache_latents(load_config(config))
    width = 4096 if size == "1.3b" else 64
    generator = torch.Generator().manual_seed(0)
    for image in sorted(media.glob("*.png")):
        save_text_cache(cache / text_cache_name(image.stem), torch.randn(12, width, generator=generator))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["1.3b", "tiny"], default="1.3b")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_estimate_"))
    root.mkdir(parents=True, exist_ok=True)
    config = prepare(root, args.size)

    from wantrainer.config_parser import load_config
    from wantrainer.estimate.cli import _shapes_from_config, knobs_from_config, largest_batch_tokens
    from wantrainer.estimate.terms import GiB, estimate

    cfg = load_config(config)
    tokens, batch, _ = largest_batch_tokens(cfg, None, None)
    knobs = knobs_from_config(cfg, "cpu", tokens, batch, 1)
    est = estimate(_shapes_from_config(cfg, knobs, None), knobs)
    done = subprocess.run([sys.executable, "-c", _MEASURE, "train", "--config", str(config),
                           "--max_train_steps", str(args.steps)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    measured = int(done.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
    print(f"size {args.size}: estimated peak RAM {est.ram / GiB:.2f} GB (training {est.train_ram / GiB:.2f} GB, "
          f"loading {est.load_ram / GiB:.2f} GB); measured peak RSS {measured / GiB:.2f} GB; "
          f"error {100 * (est.ram - measured) / measured:+.1f} %")


if __name__ == "__main__":
    main()
