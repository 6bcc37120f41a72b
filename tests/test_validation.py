"""Validation loss on the tiny kit: reproducible, the training trajectory untouched, logged, right objective."""

from __future__ import annotations

import pytest
import torch

from train_support import load, lora_tensors, write_config
from wantrainer.core.handlers.base import Handler
from wantrainer.core.handlers.validation import ValidationHandler, batch_noise, validation_losses
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.criteria.training_loss import TrainingLoss
from wantrainer.errors import UserError


class _LossRecorder(Handler):
    name = "loss_recorder"

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, trainer) -> None:
        self.losses.append(trainer.last_step.loss)


def _validation(trainer) -> ValidationHandler:
    return next(h for h in trainer.handlers if isinstance(h, ValidationHandler))


def _train_modes(trainer) -> list[bool]:
    return [m.training for net in [trainer.model, *trainer.networks.values()] for m in net.modules()]


def test_two_evaluations_are_identical_and_modes_restored(train_workspace, tmp_path):
    cfg = load(train_workspace.write(tmp_path, val=True, validate_every_n_steps=2, log_with="none",
                                     validation_timesteps="200, 800"))
    trainer = build_trainer(cfg)
    handler = _validation(trainer)
    modes = _train_modes(trainer)
    assert any(modes)
    rng = torch.get_rng_state()
    first = handler.evaluate(trainer)
    second = handler.evaluate(trainer)
    assert first == second
    assert set(first) == {"val/loss", "val/loss_t200", "val/loss_t800"}
    assert first["val/loss"] == pytest.approx((first["val/loss_t200"] + first["val/loss_t800"]) / 2)
    assert first["val/loss_t800"] != first["val/loss_t200"]
    assert _train_modes(trainer) == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_training_trajectory_is_the_same_with_and_without_validation(train_workspace, tmp_path):
    runs = {}
    for name, extra in (("plain", {}), ("validated", {"validate_every_n_steps": 1, "validate_on_epoch_end": True})):
        out = tmp_path / name
        cfg = load(train_workspace.write(out, val=bool(extra), max_train_steps=3, network_dropout=0.1, **extra))
        trainer = build_trainer(cfg)
        recorder = _LossRecorder()
        trainer.handlers.append(recorder)
        assert trainer.train() == "completed"
        runs[name] = (recorder.losses, lora_tensors(out / "out" / "lora.safetensors"))
        if extra:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            events = EventAccumulator(str(out / "out" / "logs"))
            events.Reload()
            assert [e.step for e in events.Scalars("val/loss")] == [1, 2, 3]
            assert {"val/loss_t100", "val/loss_t900"} <= set(events.Tags()["scalars"])
            assert "val" in trainer.progress_postfix
    assert runs["plain"][0] == runs["validated"][0]
    plain, validated = runs["plain"][1], runs["validated"][1]
    assert plain.keys() == validated.keys()
    assert all(torch.equal(plain[k], validated[k]) for k in plain)


def test_the_loss_is_the_flow_matching_objective(train_workspace, tmp_path):
    """Recompute one timestep by hand: x_t = (1-t) x0 + t noise, target noise - x0, model at 1000 t."""
    cfg = load(train_workspace.write(tmp_path, val=True, validate_on_epoch_end=True, log_with="none",
                                     validation_timesteps=[300], weighting_scheme="sigma_sqrt"))
    trainer = build_trainer(cfg)
    handler = _validation(trainer)
    got = handler.evaluate(trainer)["val/loss_t300"]
    batches = list(handler._batches())
    expected_sum, count = 0.0, 0
    with torch.no_grad():
        trainer.model.eval()
        for index, batch in enumerate(batches):
            x0 = batch["latents"]
            noise = batch_noise(x0.shape, handler.seed, index)
            noisy = 0.7 * x0 + 0.3 * noise
            pred = trainer.model(noisy, torch.full((x0.shape[0],), 300.0), batch["text_embeds"])
            expected_sum += float(((pred - (noise - x0)) ** 2).mean()) * x0.shape[0]
            count += x0.shape[0]
    assert got == pytest.approx(expected_sum / count, rel=1e-5)


@pytest.mark.parametrize(("world_size", "per_rank"), [(2, 2), (4, 1)])
def test_simulated_ranks_measure_the_single_process_loss(train_workspace, tmp_path, world_size, per_rank):
    """3 val items: 2 ranks x 2 split the batch of 3 as 2 + 1, 4 ranks x 1 as 1 + 1 + 1 + 0; the summed
    per-rank sums and counts give the loss of one process with the global batch."""
    from wantrainer.config.training import TimestepConfig
    from wantrainer.dataset.blueprint import resolve_datasets

    def config(batch_size):
        values = train_workspace.config(tmp_path / "out", val=True, validate_on_epoch_end=True, log_with="none",
                                        validation_timesteps=[300, 700])
        values["datasets"]["val"][0]["batch_size"] = batch_size
        return load(write_config(tmp_path / f"b{batch_size}.toml", values))

    single_cfg = config(per_rank * world_size)
    trainer = build_trainer(single_cfg)
    single = _validation(trainer)
    expected = single.evaluate(trainer)
    rank_cfg = config(per_rank)
    specs = resolve_datasets(rank_cfg.datasets, "val")
    totals = {t: [0.0, 0] for t in (300, 700)}
    keys = []
    for rank in range(world_size):
        handler = ValidationHandler.from_config(rank_cfg.validation, specs, rank_cfg.loss, TimestepConfig(),
                                                rank=rank, world_size=world_size)
        keys += [k for batch in handler._batches() for k in batch["keys"]]
        for t, (loss_sum, count) in handler.local_sums(trainer).items():
            totals[t][0] += loss_sum
            totals[t][1] += count
    assert sorted(keys) == sorted(k for batch in single._batches() for k in batch["keys"])
    assert len(keys) == 3 and all(count == 3 for _, count in totals.values())
    for t, (loss_sum, count) in totals.items():
        assert loss_sum / count == pytest.approx(expected[f"val/loss_t{t}"], rel=1e-5)


def test_triggers_without_val_data_are_an_error(train_workspace, tmp_path):
    with pytest.raises(UserError, match="datasets.val"):
        load(train_workspace.write(tmp_path, validate_every_n_steps=5))
    cfg = load(train_workspace.write(tmp_path, val=True))
    assert not any(isinstance(h, ValidationHandler) for h in build_trainer(cfg).handlers)


def test_timesteps_are_grouped_by_expert():
    """Each expert is activated once and serves only its own side of the boundary."""
    served = []
    active = {"name": None}

    def forward(x, t, ctx, conditioning):
        served.append((active["name"], float(t[0])))
        return torch.zeros_like(x)

    def batches():
        return iter([{"latents": torch.ones(1, 16, 1, 2, 2), "text_embeds": [torch.zeros(0, 4)]}])

    loss = TrainingLoss.from_config(*_loss_sections())
    sums = validation_losses(
        forward, batches, [100, 900, 500, 950], loss, seed=0, device="cpu",
        expert_for=lambda t: "high_noise" if t >= 0.875 else "low_noise",
        activate=lambda name: active.__setitem__("name", name),
    )
    assert served == [("low_noise", 100.0), ("low_noise", 500.0), ("high_noise", 900.0), ("high_noise", 950.0)]
    assert all(count == 1 for _, count in sums.values())


def _loss_sections():
    from wantrainer.config.training import LossConfig, TimestepConfig

    return LossConfig(), TimestepConfig()


def test_wan22_each_timestep_uses_its_own_expert(train_workspace, tmp_path):
    """Two different tiny experts: t=800 is measured with the high-noise weights, t=200 with the low-noise ones."""
    from wantrainer.models.wan.loading import load_wan_dit

    kit = train_workspace.kit
    cfg = load(train_workspace.write(
        tmp_path, val=True, validate_on_epoch_end=True, log_with="none", validation_timesteps=[200, 800],
        target_model="wan22", dit=str(kit.dit_wan22_low), dit_high_noise=str(kit.dit_wan22_high),
        timestep_boundary=0.5,
    ))
    trainer = build_trainer(cfg)
    handler = _validation(trainer)
    active = trainer.experts.active
    got = handler.evaluate(trainer)
    assert trainer.experts.active == active
    raw = {name: load_wan_dit(path, dtype=torch.float32).eval()
           for name, path in (("high", kit.dit_wan22_high), ("low", kit.dit_wan22_low))}

    def loss_with(dit, t):
        total, count = 0.0, 0
        with torch.no_grad():
            for index, batch in enumerate(handler._batches()):
                x0 = batch["latents"]
                noise = batch_noise(x0.shape, handler.seed, index)
                pred = dit((1 - t / 1000) * x0 + t / 1000 * noise, torch.full((x0.shape[0],), float(t)),
                           batch["text_embeds"])
                total += float(((pred - (noise - x0)) ** 2).mean()) * x0.shape[0]
                count += x0.shape[0]
        return total / count

    assert got["val/loss_t800"] == pytest.approx(loss_with(raw["high"], 800), rel=1e-5)
    assert got["val/loss_t200"] == pytest.approx(loss_with(raw["low"], 200), rel=1e-5)
    assert got["val/loss_t800"] != pytest.approx(loss_with(raw["low"], 800), rel=1e-3)
