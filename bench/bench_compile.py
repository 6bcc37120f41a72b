"""compile_blocks: seconds per training step with compiled blocks against eager ones, side by side in one run.

    .venv/bin/python bench/bench_compile.py [--size 256] [--steps 10] [--warmup 2] [--threads 1]

The real trainer on the tiny model kit and a synthetic image set cached at ``--size`` (LoRA, gradient
checkpointing), built with ``compile_blocks = true``; the blocks' compiled code is switched off and on for
alternate steps (``nn.Module.compile`` keeps it on the module), so both run under the same machine load. The
warm-up steps (``--warmup`` per setting) include the compilation, reported apart. Prints the median wall time
of each setting, their ratio, and the loss of each step (compiled and eager see different batches here; the
exactness check is ``tests/test_compile_blocks.py``).

Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import for_benchmark, synthetic_config  # noqa: E402
from bench_tread import Alternate, report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per setting (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per setting (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from wantrainer.core.wan_network_trainer import build_trainer

    compiled_impls: dict[int, object] = {}

    def eager(trainer) -> None:
        for block in trainer.model.blocks:
            compiled_impls.setdefault(id(block), block._compiled_call_impl)
            block._compiled_call_impl = None

    def compiled(trainer) -> None:
        for block in trainer.model.blocks:
            block._compiled_call_impl = compiled_impls[id(block)]

    with tempfile.TemporaryDirectory(prefix="bench_compile_") as tmp:
        root = Path(tmp)
        cfg = for_benchmark(synthetic_config(root, args.size, 1), 2 * (args.warmup + args.steps), root / "out")
        cfg.model = cfg.model.model_copy(update={"gradient_checkpointing": True, "compile_blocks": True})
        cfg.saving = cfg.saving.model_copy(update={"save_loss_plot": False})
        clock = Alternate({"eager": eager, "compiled": compiled}, args.warmup)
        start = time.perf_counter()
        trainer = build_trainer(cfg, extra_handlers=[clock])
        trainer.train()
        total = time.perf_counter() - start
    measured = sum(sum(w) for w in clock.walls.values())
    print(f"tiny kit, {args.size}x{args.size} images (batch 1), LoRA, gradient checkpointing, "
          f"{torch.get_num_threads()} thread(s); run {total:.1f} s of which warm-up with compilation "
          f"{total - measured:.1f} s")
    report(clock.walls, "eager")


if __name__ == "__main__":
    main()
