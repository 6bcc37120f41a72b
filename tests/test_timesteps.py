"""Timestep samplers: distribution properties with literal expectations, constraints, determinism."""

from __future__ import annotations

import pytest
import torch

from wantrainer.config.training import TimestepConfig
from wantrainer.errors import UserError
from wantrainer.scheduling import TimestepSampler, apply_shift, flux_shift_for_seq_len

N = 200_000


def draw(seq_len: int | None = None, seed: int = 0, **kw) -> torch.Tensor:
    sampler = TimestepSampler.from_config(TimestepConfig(**kw))
    return sampler.sample(N, torch.Generator().manual_seed(seed), seq_len=seq_len)


@pytest.mark.parametrize(
    "kw, seq_len, mean, median",
    [
        ({"timestep_sampling": "uniform"}, None, 0.5, 0.5),
        ({"timestep_sampling": "sigmoid"}, None, 0.5, 0.5),
        # shift 3: median = 3 * 0.5 / (1 + 2 * 0.5) = 0.75
        ({"timestep_sampling": "shift", "discrete_flow_shift": 3.0}, None, None, 0.75),
        # logit_normal(1, 1): median = sigmoid(1)
        ({"timestep_sampling": "logit_normal", "logit_mean": 1.0}, None, None, 0.7310586),
        # logsnr: t = sigmoid(-logSNR / 2); mean -2 -> median sigmoid(1)
        ({"timestep_sampling": "logsnr", "logit_mean": -2.0}, None, None, 0.7310586),
        # flux: 1024 tokens -> mu = 0.5 + 0.65 * 768 / 3840 = 0.63, shift e^0.63 = 1.8776 -> median 0.6524
        ({"timestep_sampling": "flux_shift"}, 1024, None, 0.6524),
    ],
)
def test_distribution_centres(kw, seq_len, mean, median):
    t = draw(seq_len=seq_len, **kw)
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert 0.0 < t.min().item() and t.max().item() < 1.0
    if mean is not None:
        assert t.mean().item() == pytest.approx(mean, abs=0.004)
    assert t.median().item() == pytest.approx(median, abs=0.004)


def test_uniform_quantiles_and_sigmoid_scale_spreads():
    t = draw(timestep_sampling="uniform")
    q = torch.quantile(t[:100_000], torch.tensor([0.1, 0.9]))
    assert q.tolist() == pytest.approx([0.1, 0.9], abs=0.005)
    # sigmoid(N(0,1)): P(t < 0.1) = Phi(logit(0.1)) = Phi(-2.197) = 0.0140; scale 3 spreads mass out.
    narrow = (draw(timestep_sampling="sigmoid") < 0.1).float().mean().item()
    wide = (draw(timestep_sampling="sigmoid", sigmoid_scale=3.0) < 0.1).float().mean().item()
    assert narrow == pytest.approx(0.0140, abs=0.002)
    assert wide == pytest.approx(0.2320, abs=0.004)  # Phi(-2.197 / 3)


def test_qinglong_mixture():
    t = draw(timestep_sampling="qinglong", seq_len=1024)
    # 12.5 % logsnr(5.36, 1): P(t < 0.1) = P(z > -0.966) = 0.833 -> 0.104; flux part adds ~0.002.
    assert (t < 0.1).float().mean().item() == pytest.approx(0.106, abs=0.004)
    assert t.median().item() == pytest.approx(0.591, abs=0.006)


def test_min_max_rescale_keeps_shape():
    t = draw(timestep_sampling="uniform", min_timestep=200, max_timestep=400)
    assert t.min().item() >= 0.2 and t.max().item() <= 0.4
    assert t.mean().item() == pytest.approx(0.3, abs=0.002)
    # shift 3 median 0.75 maps to 0.2 + 0.2 * 0.75 = 0.35 (rescaled, not rejected)
    s = draw(timestep_sampling="shift", min_timestep=200, max_timestep=400)
    assert s.median().item() == pytest.approx(0.35, abs=0.002)
    only_max = draw(timestep_sampling="uniform", max_timestep=100)
    assert only_max.max().item() <= 0.1 and only_max.mean().item() == pytest.approx(0.05, abs=0.001)


def test_bad_range_is_a_user_error():
    with pytest.raises(UserError, match="min_timestep"):
        TimestepSampler.from_config(TimestepConfig(min_timestep=500, max_timestep=500))


def test_deterministic_with_generator():
    a = draw(timestep_sampling="qinglong", seq_len=256, seed=3)
    b = draw(timestep_sampling="qinglong", seq_len=256, seed=3)
    c = draw(timestep_sampling="qinglong", seq_len=256, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flux_shift_needs_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        TimestepSampler(method="flux_shift").sample(4)


def test_shift_helpers():
    assert flux_shift_for_seq_len(256) == pytest.approx(1.6487213)  # e^0.5
    assert flux_shift_for_seq_len(4096) == pytest.approx(3.1581929)  # e^1.15
    assert apply_shift(torch.tensor(0.5), 1.0).item() == pytest.approx(0.5)
