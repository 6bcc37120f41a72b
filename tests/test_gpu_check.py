"""``bench/gpu_check.sh --dry-run``: every row of the GPU check runs on the tiny kit on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    trained = [r for r in rows.values() if "s_per_step" in r]
    assert len(trained) == 6 and all(r["status"] == "ok" and r["s_per_step"] > 0 for r in trained), rows
    assert "TREAD 0.5" in rows and rows["compile_blocks"]["status"].startswith("skipped: not in the dry run")
    assert rows["fp8_scaled + fp8_matmul"]["status"].startswith("skipped: it needs a CUDA GPU")
    assert rows["GC off x5"]["tflop_per_step"] < rows["fp32 x5 (GC on)"]["tflop_per_step"]  # one forward less
    cache = next(r for r in rows.values() if r["row"].startswith("cache-latents"))
    sample = next(r for r in rows.values() if r["row"].startswith("sample"))
    assert cache["status"] == "ok" and cache["clips"] == 2 and sample["status"] == "ok"
    assert "| row | status |" in done.stdout  # the table


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--dry-run" in done.stderr
