"""Preservation terms follow the objective's loss mask: with the TI2V-5B's image-to-video items the given first
latent frame is out of every loss, DOP's and the slider's included (their prediction there changes nothing)."""

from __future__ import annotations

import contextlib

import torch

from wantrainer.enhancements.base import StepContext
from wantrainer.enhancements.dop.config import DopConfig
from wantrainer.enhancements.dop.dop_helper import DopHelper
from wantrainer.enhancements.slider.config import SliderConfig
from wantrainer.enhancements.slider.slider_helper import SliderHelper

PAIR = {"target": "a shape", "positive": "a big shape", "negative": "a small shape"}


class _Network:
    """A stand-in adapter: its multiplier scales a fixed change of the prediction."""

    def __init__(self):
        self.multiplier = 1.0

    def set_multiplier(self, value):
        self.multiplier = float(value)

    @contextlib.contextmanager
    def network_disabled(self):
        saved, self.multiplier = self.multiplier, 0.0
        try:
            yield
        finally:
            self.multiplier = saved


def _ctx(network, frame0_change: float, mask: bool) -> StepContext:
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    t = torch.tensor([0.3, 0.7])
    change = torch.full((1, 4, 3, 2, 2), 0.5)
    change[:, :, 0] = frame0_change  # what the adapter does on the given frame

    def forward(model, x, timesteps, text_embeds, conditioning):
        return x * 0.9 + network.multiplier * change + 0.01 * len(text_embeds[0])

    keep = torch.ones(2, 1, 3, 1, 1)
    keep[:, :, 0] = 0.0
    return StepContext(batch={"text_embeds": [torch.zeros(3, 8)] * 2}, latents=latents, noise=noise,
                       noisy=(1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise,
                       target=noise - latents, t=t, timesteps=1000 * t, model=torch.nn.Identity(),
                       network=network, forward=forward, backward=lambda term: None,
                       loss_mask=keep if mask else None)


def _dop_loss(frame0_change: float, mask: bool) -> float:
    dop = DopHelper(DopConfig(enable_dop=True, dop_prompt="blank", dop_weight=1.0))
    return float(dop.loss(_ctx(_Network(), frame0_change, mask))[0])


def _slider_loss(frame0_change: float, mask: bool) -> float:
    slider = SliderHelper(SliderConfig(slider_pairs=[PAIR]), seed=1)
    slider.embeds = {f"p0_{role}": torch.full((3, 8), float(i)) for i, role in
                     enumerate(("target", "positive", "negative", "neutral"))}
    return float(slider.loss(_ctx(_Network(), frame0_change, mask))[0])


def test_dop_and_slider_leave_the_given_frame_out():
    for loss in (_dop_loss, _slider_loss):
        assert loss(0.5, mask=True) == loss(50.0, mask=True)  # frame 0 out: its change is not seen
        assert loss(50.0, mask=False) > 100 * loss(0.5, mask=False)  # without the mask it dominates
