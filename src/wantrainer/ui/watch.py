"""What a run has written: curves from its TensorBoard event files, samples, saved LoRAs and states.

The event files are read with TensorBoard's own reader (``EventAccumulator``), one per file, kept between calls
so each poll reads only the new events. A resumed run writes a new event file; where two files overlap, the
newer one wins from its first step on (the interrupted run's tail was not kept).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from ..core.run_folder import earlier_saves

SAMPLE_SUFFIXES = {".mp4", ".webm", ".png", ".jpg", ".jpeg", ".webp", ".gif"}
MAX_POINTS = 2000
_STEP = re.compile(r"-(?:step)?(\d+)(?:-ema)?(?:\.safetensors|-state)$")


class EventReader:
    """Scalars of every event file in a folder whose name ends with ``.{output_name}`` (or all of them)."""

    def __init__(self) -> None:
        self._accumulators: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def _accumulator(self, path: Path) -> Any:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

        acc = self._accumulators.get(path)
        if acc is None:
            acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
            self._accumulators[path] = acc
        acc.Reload()
        return acc

    def scalars(self, log_dir: Path, output_name: str | None = None) -> dict[str, list[list[float]]]:
        """``{tag: [[step, value], ...]}`` sorted by step (at most ``MAX_POINTS`` per tag, evenly thinned)."""
        if not log_dir.is_dir():
            return {}
        files = sorted((p for p in log_dir.glob("events.out.tfevents.*") if p.is_file()),
                       key=lambda p: (p.stat().st_mtime, p.name))
        if output_name is not None:
            mine = [p for p in files if p.name.endswith(f".{output_name}")]
            files = mine or files
        curves: dict[str, list[list[float]]] = {}
        with self._lock:
            for path in files:
                acc = self._accumulator(path)
                for tag in acc.Tags().get("scalars", []):
                    points = [[e.step, e.value] for e in acc.Scalars(tag)]
                    if not points:
                        continue
                    first = points[0][0]
                    kept = [p for p in curves.get(tag, []) if p[0] < first]
                    curves[tag] = kept + points
        for tag, points in curves.items():
            points.sort(key=lambda p: p[0])
            if len(points) > MAX_POINTS:
                stride = len(points) / MAX_POINTS
                curves[tag] = [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]
        return curves


def _step_of(name: str) -> int | None:
    found = _STEP.search(name)
    return int(found.group(1)) if found else None


def saves(output_dir: Path, output_name: str) -> list[dict[str, Any]]:
    """LoRA files and state folders of ``output_name``, with the step (or epoch) their name carries."""
    items = []
    for path in earlier_saves(output_dir, output_name):
        kind = "state" if path.is_dir() else "lora"
        stem = path.name
        items.append({"name": stem, "path": str(path), "kind": kind, "step": _step_of(stem),
                      "epoch": "-step" not in stem and _step_of(stem) is not None,
                      "mtime": path.stat().st_mtime,
                      "size": path.stat().st_size if kind == "lora" else None})
    items.sort(key=lambda i: (i["step"] is None, i["step"] or 0, i["kind"], i["name"]))  # final saves last
    return items


def media(folder: Path, pattern: str = "*") -> list[dict[str, Any]]:
    """Sample videos / images (or doctor plots) in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES]
    found.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return [{"name": p.name, "path": str(p), "kind": "video" if p.suffix.lower() in (".mp4", ".webm") else "image",
             "mtime": p.stat().st_mtime} for p in found]
