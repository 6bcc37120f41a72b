"""Element losses, timestep weighting (checked against diffusers) and the composed training loss."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from wantrainer.config.training import LossConfig, TimestepConfig
from wantrainer.criteria import LossContext, TrainingLoss, element_loss, timestep_weight
from wantrainer.errors import UserError

D = torch.tensor([0.0, 0.05, 0.1, 0.5, -2.0])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("mse", [0.0, 0.0025, 0.01, 0.25, 4.0]),
        ("l1", [0.0, 0.05, 0.1, 0.5, 2.0]),
        # d^2 inside c = 0.1, 2c|d| - c^2 outside
        ("huber", [0.0, 0.0025, 0.01, 0.09, 0.39]),
        # 2c (sqrt(d^2 + c^2) - c)
        ("pseudo_huber", [0.0, 0.0023607, 0.0082843, 0.0819804, 0.3804994]),
    ],
)
def test_element_losses(loss_type, expected):
    out = element_loss(loss_type, huber_c=0.1)(D, torch.zeros_like(D))
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_weighting_matches_diffusers_sd3():
    t = torch.linspace(0.001, 0.999, 101)
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ours = timestep_weight(scheme, t)
        ref = compute_loss_weighting_for_sd3(scheme, sigmas=t)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme, kw", [("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}), ("mode", {"mode_scale": 1.29})])
def test_density_weighting_is_importance_weighting(scheme, kw):
    """E_uniform[w(t) g(t)] equals E[g(t)] under diffusers' SD3 sampler of the same scheme."""
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    ref = compute_density_for_timestep_sampling(
        scheme, n, logit_mean=kw.get("logit_mean"), logit_std=kw.get("logit_std"), mode_scale=kw.get("mode_scale"),
        generator=gen,
    )
    u = torch.rand(n, generator=gen).clamp(1e-6, 1 - 1e-6)
    w = timestep_weight(scheme, u, **kw)
    assert w.mean().item() == pytest.approx(1.0, abs=0.01)  # a density integrates to 1
    for g in (lambda x: x, lambda x: x * x, lambda x: torch.cos(3 * x)):
        assert (w * g(u)).mean().item() == pytest.approx(g(ref).mean().item(), abs=0.006)


def test_mode_scale_zero_is_uniform_and_bad_scale_rejected():
    t = torch.linspace(0.01, 0.99, 9)
    assert timestep_weight("mode", t, mode_scale=0.0).tolist() == pytest.approx([1.0] * 9, abs=1e-6)
    with pytest.raises(UserError, match="mode_scale"):
        TrainingLoss.from_config(LossConfig(), TimestepConfig(weighting_scheme="mode", mode_scale=2.0))


def make_batch(b=3):
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(b, 16, 2, 4, 4, generator=gen)
    target = torch.randn(b, 16, 2, 4, 4, generator=gen)
    return pred, target


def test_flow_matching_loss_reduction_and_weights():
    pred, target = make_batch()
    t = torch.tensor([0.2, 0.5, 0.8])
    per_sample = (pred - target).square().mean(dim=(1, 2, 3, 4))
    loss_fn = TrainingLoss.from_config(LossConfig(), TimestepConfig())
    loss, metrics = loss_fn(pred, target, {"loss_weight": torch.ones(3)}, LossContext(t=t))
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert metrics["loss/total"].item() == pytest.approx(loss.item())
    # prior_loss_weight: a reg item with weight 0.5 counts half
    w = torch.tensor([1.0, 0.5, 1.0])
    loss_w, _ = loss_fn(pred, target, {"loss_weight": w}, {"t": t})
    assert loss_w.item() == pytest.approx((per_sample * w).mean().item(), rel=1e-6)
    # cosmap weighting multiplies each sample by 2 / (pi (1 - 2t + 2t^2))
    cos_fn = TrainingLoss.from_config(LossConfig(), TimestepConfig(weighting_scheme="cosmap"))
    loss_c, _ = cos_fn(pred, target, {"loss_weight": torch.ones(3)}, {"t": t})
    wt = torch.tensor([2 / (math.pi * (1 - 2 * x + 2 * x * x)) for x in t.tolist()])
    assert loss_c.item() == pytest.approx((per_sample * wt).mean().item(), rel=1e-5)


def test_gradient_flows_and_extra_terms_sum():
    pred, target = make_batch()
    pred.requires_grad_(True)
    loss_fn = TrainingLoss.from_config(LossConfig(loss_type="pseudo_huber", huber_c=0.5), TimestepConfig())

    def l2_reg(pred, target, batch, ctx):
        value = 0.01 * pred.square().mean()
        return value, {"loss/reg": value.detach()}

    base, _ = loss_fn(pred, target, {}, {"t": torch.full((3,), 0.5)})
    loss_fn.add_term("reg", l2_reg)
    total, metrics = loss_fn(pred, target, {}, {"t": torch.full((3,), 0.5)})
    assert total.item() == pytest.approx(base.item() + metrics["loss/reg"].item(), rel=1e-6)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        loss_fn.add_term("reg", l2_reg)


def test_bf16_prediction_is_upcast():
    pred, target = make_batch()
    loss_fn = TrainingLoss.from_config(LossConfig(), TimestepConfig())
    loss, _ = loss_fn(pred.bfloat16(), target, {}, {"t": torch.full((3,), 0.5)})
    assert loss.dtype == torch.float32
