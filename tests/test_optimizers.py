"""Optimiser factory and learning-rate schedules (literal values, parity with transformers)."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from wantrainer.config.training import OptimizerConfig
from wantrainer.errors import UserError
from wantrainer.optimizers import create_lr_scheduler, create_optimizer


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3))]


def opt(**kw):
    return create_optimizer(OptimizerConfig(**kw), [{"params": params()}])


def lrs(steps: int, total: int = 100, **kw) -> list[float]:
    cfg = OptimizerConfig(learning_rate=1.0, **kw)
    optimizer = torch.optim.SGD(params(), lr=1.0)
    sched = create_lr_scheduler(cfg, optimizer, total)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return out


def test_adamw_with_literal_args_and_param_group_lrs():
    o = opt(optimizer_args=["weight_decay=0.05", "betas=(0.8, 0.95)"], learning_rate=2e-4)
    assert isinstance(o, torch.optim.AdamW)
    assert o.param_groups[0]["betas"] == (0.8, 0.95) and o.param_groups[0]["weight_decay"] == 0.05
    groups = [{"params": params(), "lr": 1e-4}, {"params": params(), "lr": 1.6e-3}]
    o = create_optimizer(OptimizerConfig(learning_rate=1e-4), groups)
    assert [g["lr"] for g in o.param_groups] == [1e-4, 1.6e-3]


def test_adafactor_defaults_to_fixed_lr_and_dotted_path():
    o = opt(optimizer_type="adafactor", learning_rate=3e-4)
    assert type(o).__name__ == "Adafactor" and o.param_groups[0]["relative_step"] is False
    assert o.param_groups[0]["lr"] == 3e-4
    rel = opt(optimizer_type="adafactor", optimizer_args=["relative_step=True", "warmup_init=True"])
    assert rel.param_groups[0]["lr"] is None
    sgd = opt(optimizer_type="torch.optim.SGD", optimizer_args=["momentum=0.9"])
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"optimizer_args": ["weight_decay=__import__('os')"]}, "weight_decay"),
        ({"optimizer_args": ["no_equals_sign"]}, "key=value"),
        ({"optimizer_args": ["nonexistent_arg=1"]}, "nonexistent_arg"),
        ({"optimizer_type": "adamw8bit"}, "bitsandbytes"),
        ({"optimizer_type": "prodigy"}, "prodigyopt"),
        ({"optimizer_type": "sgdd"}, "unknown"),
        ({"optimizer_type": "torch.optim.Nope"}, "cannot be imported"),
        ({"optimizer_type": "torch.nn.Linear"}, "not a torch.optim.Optimizer"),
    ],
)
def test_bad_optimizer_settings_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        opt(**kw)


def test_lion_available_or_clear_error():
    try:
        o = opt(optimizer_type="lion")
    except UserError as exc:
        assert "lion-pytorch" in str(exc)
    else:
        assert type(o).__name__ == "Lion"


def test_schedule_values_at_known_steps():
    assert lrs(3, lr_scheduler="constant") == [1.0, 1.0, 1.0]
    assert lrs(6, total=10, lr_scheduler="constant_with_warmup", lr_warmup_steps=4) == [0, 0.25, 0.5, 0.75, 1, 1]
    assert lrs(11, total=10, lr_scheduler="linear") == pytest.approx([1 - i / 10 for i in range(10)] + [0.0])
    cos = lrs(11, total=10, lr_scheduler="cosine")
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0, abs=1e-12)
    # warm-up as a fraction: 0.2 of 10 steps = 2
    assert lrs(4, total=10, lr_scheduler="linear", lr_warmup_steps=0.2) == pytest.approx([0.0, 0.5, 1.0, 0.875])
    restarts = lrs(10, total=10, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert restarts[0] == 1.0 and restarts[5] == 1.0 and restarts[4] == pytest.approx(0.0954915)
    poly = lrs(11, total=10, lr_scheduler="polynomial", lr_scheduler_power=2.0)
    assert poly[5] == pytest.approx(0.25) and poly[10] == 0.0
    min_lr = lrs(11, total=10, lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1)
    assert min_lr[5] == pytest.approx(0.55) and min_lr[10] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "name, extra, hf_kwargs",
    [
        ("linear", {}, {}),
        ("cosine", {}, {}),
        ("constant_with_warmup", {}, {}),
        ("cosine_with_restarts", {"lr_scheduler_num_cycles": 3}, {"scheduler_specific_kwargs": {"num_cycles": 3}}),
        ("cosine_with_min_lr", {"lr_scheduler_min_lr_ratio": 0.2}, {"scheduler_specific_kwargs": {"min_lr_rate": 0.2}}),
    ],
)
def test_matches_transformers_schedules(name, extra, hf_kwargs):
    """Same values over the run (after the last step ours stays at the final value; transformers' cosine rises)."""
    ours = lrs(51, total=50, lr_scheduler=name, lr_warmup_steps=7, **extra)
    optimizer = torch.optim.SGD(params(), lr=1.0)
    sched = get_scheduler(name, optimizer, num_warmup_steps=7, num_training_steps=50, **hf_kwargs)
    ref = []
    for _ in range(51):
        ref.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert ours == pytest.approx(ref, abs=1e-9)


def test_warmup_longer_than_run_and_state_roundtrip():
    with pytest.raises(UserError, match="lr_warmup_steps"):
        lrs(1, total=10, lr_scheduler="cosine", lr_warmup_steps=10)
    cfg = OptimizerConfig(learning_rate=1.0, lr_scheduler="cosine", lr_warmup_steps=2)
    o1 = torch.optim.SGD(params(), lr=1.0)
    s1 = create_lr_scheduler(cfg, o1, 20)
    for _ in range(7):
        o1.step()
        s1.step()
    o2 = torch.optim.SGD(params(), lr=1.0)
    s2 = create_lr_scheduler(cfg, o2, 20)
    s2.load_state_dict(s1.state_dict())
    assert s2.get_last_lr() == s1.get_last_lr()
    o1.step(), s1.step(), o2.step(), s2.step()
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"]


def test_adafactor_relative_step_runs_with_a_reporting_schedule():
    cfg = OptimizerConfig(optimizer_type="adafactor", optimizer_args=["relative_step=True"], lr_scheduler="constant")
    p = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    optimizer = create_optimizer(cfg, [{"params": [p], "lr": 1e-4}])
    scheduler = create_lr_scheduler(cfg, optimizer, 10)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    lr = scheduler.get_last_lr()[0]
    assert 0.0 < lr == optimizer.param_groups[0]["lr"]  # Adafactor's own step size, reported for the logs
    for bad in (dict(lr_scheduler="cosine"), dict(lr_warmup_steps=2)):
        with pytest.raises(UserError, match="relative_step"):
            create_lr_scheduler(cfg.model_copy(update=bad), create_optimizer(cfg, [{"params": [p]}]), 10)
    with pytest.raises(UserError, match="loraplus_lr_ratio"):
        create_optimizer(cfg, [{"params": [p], "lr": 1e-4}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3}])
