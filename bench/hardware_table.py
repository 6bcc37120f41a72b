"""The README's "Hardware: what fits" table, from `wantrainer estimate`'s terms and fitting steps.

    python bench/hardware_table.py   # prints the table's rows (rank-32 LoRA, AdamW, bf16, batch 1)

Each cell: the settings `estimate --vram N` turns on, in order, until the run fits, and the system RAM the
training then needs (GB, rounded up), or "does not fit" when only fewer tokens would fit.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from pathlib import Path

from wantrainer.config_parser import load_config
from wantrainer.estimate.cli import _shapes_from_config, _tokens, fitting_steps, knobs_from_config
from wantrainer.estimate.terms import GiB, estimate

SHORT = {"gradient_checkpointing": "GC", "dit_weight_dtype": "fp8", "optimizer_type": "8-bit AdamW",
         "gradient_checkpointing_cpu_offload": "GC offload"}
MODELS = [("Wan 2.1 1.3B", "wan21_t2v_1.3b"), ("Wan 2.1 14B", "wan21_t2v_14b"), ("Wan 2.2 A14B", "wan22_t2v_a14b"),
          ("Wan 2.2 TI2V 5B", "wan22_ti2v_5b")]
BATCHES = [("512x512 image", (512, 512), 1), ("832x480x33", (832, 480), 33), ("832x480x81", (832, 480), 81)]
BUDGETS = (12, 16, 24, 48, 80)


def write_config(root: Path) -> Path:
    path = root / "c.toml"
    path.write_text(f"""dit = "{root / 'dit.safetensors'}"
vae = "{root / 'vae.safetensors'}"
mixed_precision = "bf16"
network_dim = 32
network_alpha = 32
output_dir = "{root / 'out'}"
[[datasets.train]]
image_directory = "{root}"
resolution = [512, 512]
""", encoding="utf-8")
    return path


def cell(shapes_for, knobs, vram: int) -> str:
    est = estimate(shapes_for(knobs), knobs)
    if est.vram <= vram * GiB:
        return f"as is, RAM {math.ceil(est.train_ram / GiB)}"
    steps = fitting_steps(shapes_for, knobs, vram * GiB)
    if steps[-1][0].startswith("fewer tokens"):
        return "does not fit"
    names = []
    for text, _ in steps:
        key = text.split(" ")[0]
        names.append(f"swap {text.split('= ')[1]}" if key == "blocks_to_swap" else SHORT[key])
    return f"{' + '.join(names)}; RAM {math.ceil(steps[-1][1].train_ram / GiB)}"


def main() -> None:
    logging.disable(logging.INFO)
    cfg = load_config(write_config(Path(tempfile.mkdtemp(prefix="hardware_table_"))))
    for label, preset in MODELS:
        shapes_for = functools.partial(_shapes_from_config, cfg, preset=preset)
        for text, size, frames in BATCHES:
            step = 32 if preset == "wan22_ti2v_5b" else 16  # the Wan 2.2 VAE's 16x cells, patchified by 2
            experts = 2 if preset == "wan22_t2v_a14b" else 1
            knobs = knobs_from_config(cfg, "cuda", _tokens(size, frames, 1, step), 1, experts)
            print(f"| {label} | {text} | " + " | ".join(cell(shapes_for, knobs, v) for v in BUDGETS) + " |")


if __name__ == "__main__":
    main()
