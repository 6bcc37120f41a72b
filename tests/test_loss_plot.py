"""The loss plot beside each saved LoRA: written, readable, not blank; switched off, the run is bit-identical."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from train_support import load, lora_tensors
from wantrainer.core.handlers.loss_plot import LossHistory, smoothed
from wantrainer.core.wan_network_trainer import build_trainer


def test_loss_plot_beside_each_save_and_switched_off(train_workspace, tmp_path):
    common = dict(max_train_steps=4, save_every_n_steps=2, validate_every_n_steps=2, validation_timesteps=[200, 800],
                  log_with="none")
    trainer = build_trainer(load(train_workspace.write(tmp_path / "on", val=True, **common)))
    assert trainer.train() == "completed"
    out = tmp_path / "on" / "out"
    assert sorted(p.name for p in out.glob("*_loss.png")) == ["lora-step00000002_loss.png", "lora_loss.png"]
    history = next(h for h in trainer.handlers if isinstance(h, LossHistory))
    assert [s for s, _ in history.train] == [1, 2, 3, 4] and sorted(history.val) == [200, 800]
    assert [s for s, _ in history.val[200]] == [2, 4]
    with Image.open(out / "lora_loss.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert image.width >= 900 and image.height >= 300  # two panels: training and validation
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.01  # lines and text on a white page
    off = build_trainer(load(train_workspace.write(tmp_path / "off", val=True, save_loss_plot=False, **common)))
    assert off.train() == "completed"
    assert not list((tmp_path / "off" / "out").glob("*.png"))
    a, b = lora_tensors(out / "lora.safetensors"), lora_tensors(tmp_path / "off" / "out" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_smoothing_is_an_unbiased_moving_average():
    assert smoothed([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]
    values = smoothed([1.0, 0.0])
    assert values[0] == 1.0 and abs(values[1] - 0.9 / 1.9) < 1e-12
