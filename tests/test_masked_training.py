"""[masked_training] on the tiny kit: where the gradients come from, a mask of ones, the prior term's effect,
hooks off, the feature off, resume, metrics and the config rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train_support import load, write_config
from wantrainer.caching.cache_latents import cache_latents
from wantrainer.config_parser import parse_config
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.enhancements.base import network_disabled
from wantrainer.enhancements.registry import build_enhancements
from wantrainer.errors import ConfigError, UserError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class MaskedWorkspace:
    """The train workspace's cached images with masks: ``half`` (left half learnt) and ``ones`` (all learnt), each
    in a copy of the latent / text caches with the mask caches beside them."""

    def __init__(self, root: Path, workspace):
        self.workspace = workspace
        self.caches: dict[str, Path] = {}
        self.masks: dict[str, Path] = {}
        for kind in ("half", "ones"):
            masks = root / f"masks_{kind}"
            masks.mkdir()
            for image in sorted(workspace.train_media.glob("*.png")):
                width, height = Image.open(image).size
                array = np.full((height, width), 255, np.uint8)
                if kind == "half":
                    array[:, width // 2:] = 0
                Image.fromarray(array, mode="L").save(masks / image.name)
            cache = shutil.copytree(workspace.train_cache, root / f"cache_{kind}")
            self.caches[kind], self.masks[kind] = cache, masks
            cache_latents(load(write_config(root / f"{kind}.toml", self.values(root / "unused", kind))))

    def values(self, out: Path, kind: str | None, **overrides) -> dict:
        values = self.workspace.config(out, log_with="none", **overrides)
        if kind is not None:
            values["datasets"]["train"][0].update(cache_directory=str(self.caches[kind]),
                                                  mask_directory=str(self.masks[kind]))
            values.setdefault("use_masked_training_with_prior", True)
        return values

    def trainer(self, tmp: Path, kind: str | None, **overrides):
        return build_trainer(load(write_config(tmp / "config.toml", self.values(tmp / "out", kind, **overrides))))


@pytest.fixture(scope="module")
def masked(tmp_path_factory, train_workspace):
    return MaskedWorkspace(tmp_path_factory.mktemp("masked"), train_workspace)


def _lora(out: Path, name: str = "lora.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(out / name))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step_context(trainer, batch, draws):
    """``batch`` noised (generators at ``draws``) and predicted exactly as the loop does (``pred`` keeps its
    gradient)."""
    trainer.noise_gen.set_state(draws[0])
    trainer.timestep_gen.set_state(draws[1])
    batch = trainer._to_device(batch)
    ctx = trainer._noised_inputs(batch, trainer.experts.names[0])
    ctx.pred = trainer.call_model(trainer.model, ctx.noisy, ctx.timesteps, batch["text_embeds"],
                                  batch.get("conditioning"))
    ctx.pred.retain_grad()
    return ctx


def _lora_grads(trainer) -> list[torch.Tensor]:
    return [p.grad.clone() for g in trainer.groups for p in g.params]


def test_gradients_come_only_from_the_masked_region(masked, tmp_path):
    trainer = masked.trainer(tmp_path, "half", unmasked_weight=0.0)
    draws = trainer.noise_gen.get_state(), trainer.timestep_gen.get_state()
    batch = next(iter(trainer.loader))
    ctx = _step_context(trainer, batch, draws)
    mask = ctx.item_extra("mask")  # [B, F, H, W]
    assert mask.shape == (2, 1, 8, 8) and float(mask[..., :4].min()) == 1.0 and float(mask[..., 4:].max()) == 0.0
    loss, _ = trainer.compute_loss(ctx)
    loss.backward()
    grad = ctx.pred.grad  # [B, C, F, H, W]
    assert bool((grad[..., 4:] == 0).all())  # no gradient at all outside the mask
    assert float((grad[..., :4] != 0).float().mean()) > 0.99  # and one almost everywhere inside it
    first = _lora_grads(trainer)
    # the target outside the mask changed to noise: the LoRA gradients are the same, bit for bit
    trainer._zero_grad()
    ctx2 = _step_context(trainer, batch, draws)
    assert torch.equal(ctx2.noisy, ctx.noisy)
    outside = (1 - ctx2.item_extra("mask")).unsqueeze(1)
    ctx2.target = ctx2.target + 5.0 * torch.randn(ctx2.target.shape, generator=torch.Generator().manual_seed(3)) * outside
    loss2, _ = trainer.compute_loss(ctx2)
    loss2.backward()
    assert all(torch.equal(a, b) for a, b in zip(first, _lora_grads(trainer)))
    assert float(loss2.detach()) == float(loss.detach())
    # with unmasked_weight = 0.5 the same change does reach the gradients
    control = masked.trainer(tmp_path / "control", "half", unmasked_weight=0.5)
    ctx3 = _step_context(control, batch, draws)
    ctx3.target = ctx3.target + 5.0 * torch.randn(ctx3.target.shape, generator=torch.Generator().manual_seed(3)) * outside
    control.compute_loss(ctx3)[0].backward()
    assert not all(torch.equal(a, b) for a, b in zip(first, _lora_grads(control)))


def test_a_mask_of_ones_is_unmasked_training_exactly(masked, tmp_path):
    trainer = masked.trainer(tmp_path / "ones", "ones", masked_prior_preservation_weight=1.0, max_train_steps=3)
    assert [e.name for e in trainer.enhancements] == ["masked_training"]
    assert trainer.train() == "completed"
    assert trainer.last_step.metrics["masked_training/coverage"] == 1.0
    assert masked.trainer(tmp_path / "plain", None, max_train_steps=3).train() == "completed"
    assert _same(_lora(tmp_path / "ones" / "out"), _lora(tmp_path / "plain" / "out"))


def test_the_feature_off_is_the_baseline_bit_for_bit(masked, tmp_path, monkeypatch):
    cfg = load(write_config(tmp_path / "off.toml", masked.values(tmp_path / "off" / "out", None, max_train_steps=3)))
    assert build_enhancements(cfg) == []
    assert build_trainer(cfg).train() == "completed"
    from wantrainer.enhancements import registry

    monkeypatch.setattr(registry, "registered", lambda: {})  # no plug-in exists at all
    assert masked.trainer(tmp_path / "none", None, max_train_steps=3).train() == "completed"
    assert _same(_lora(tmp_path / "off" / "out"), _lora(tmp_path / "none" / "out"))


def _outside_drift(trainer) -> tuple[float, float]:
    """Mean |LoRA-on - base| of the prediction outside and inside the masks, on the training items noised at
    t = 0.3, 0.6, 0.9 with fixed noise."""
    network = trainer.networks["default"]
    batches = list(trainer.loader)
    out, inside = [], []
    with torch.no_grad():
        for batch in batches:
            batch = trainer._to_device(batch)
            mask = batch["item_extras"]["mask"].unsqueeze(1)
            for t in (0.3, 0.6, 0.9):
                noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(int(t * 10)))
                x = (1 - t) * batch["latents"] + t * noise
                steps = torch.full((x.shape[0],), t * 1000.0)
                on = trainer.call_model(trainer.model, x, steps, batch["text_embeds"])
                with network_disabled(network):
                    base = trainer.call_model(trainer.model, x, steps, batch["text_embeds"])
                diff = (on - base).abs()
                out.append(float((diff * (1 - mask)).sum() / ((1 - mask).sum() * diff.shape[1])))
                inside.append(float((diff * mask).sum() / (mask.sum() * diff.shape[1])))
    return sum(out) / len(out), sum(inside) / len(inside)


def test_prior_preservation_keeps_the_base_prediction_outside_the_mask(masked, tmp_path):
    drift = {}
    for weight in (0.0, 1.0, 4.0):
        trainer = masked.trainer(tmp_path / str(weight), "half", max_train_steps=12, learning_rate=2e-2,
                                 unmasked_weight=0.0, masked_prior_preservation_weight=weight)
        assert trainer.train() == "completed"
        drift[weight] = _outside_drift(trainer)
        assert (trainer.last_step.metrics.get("masked_training/prior_loss", 0.0) > 0) == (weight > 0)
    outside = {w: d[0] for w, d in drift.items()}
    # mean |LoRA-on - base| outside the mask after 12 steps (measured: 0.271 without the prior term, 0.191 with
    # weight 1, 0.064 with weight 4): the prior keeps the prediction there closer to the base model's
    assert outside[1.0] < 0.8 * outside[0.0] and outside[4.0] < 0.35 * outside[0.0], drift
    assert outside[0.0] > 0.1, drift  # without it, the LoRA did move the prediction outside the mask


def test_hooks_leave_the_model_bit_identical(masked, tmp_path):
    trainer = masked.trainer(tmp_path, "half", masked_prior_preservation_weight=1.0, max_train_steps=2,
                             learning_rate=5e-2)
    model, network = trainer.model, trainer.networks["default"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.train() == "completed"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert network.multiplier == 1.0
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_resume_with_masks_and_prior_is_bit_identical(masked, tmp_path):
    common = dict(masked_prior_preservation_weight=0.5, unmasked_weight=0.1, max_train_steps=4)
    assert masked.trainer(tmp_path / "full", "half", **common).train() == "completed"
    first = masked.trainer(tmp_path / "first", "half", save_every_n_steps=2, save_state=True, **common)
    first.total_steps = 2  # stop where the state was saved, as an interruption would
    first.train()
    state = tmp_path / "first" / "out" / "lora-step00000002-state"
    assert state.is_dir()
    resumed = masked.trainer(tmp_path / "resumed", "half", resume=str(state), **common)
    assert resumed.train() == "completed"
    assert _same(_lora(tmp_path / "full" / "out"), _lora(tmp_path / "resumed" / "out"))


def test_full_finetune_cannot_preserve_the_prior(masked, tmp_path):
    values = masked.values(tmp_path / "out", "half", network_module="full", masked_prior_preservation_weight=1.0)
    for key in ("network_dim", "network_alpha", "save_precision"):
        values.pop(key)
    with pytest.raises(UserError, match="masked_prior_preservation_weight.*full fine-tune"):
        build_trainer(load(write_config(tmp_path / "config.toml", values)))


def test_config_rules(tmp_path):
    def problems(values):
        with pytest.raises(ConfigError) as err:
            parse_config(values, config_dir=tmp_path)
        return str(err.value)

    train = [{"image_directory": "images", "cache_directory": "c"}]
    assert "no [[datasets.train]] table has a `mask_directory`" in problems(
        {"use_masked_training_with_prior": True, "datasets": {"train": train}})
    with_masks = [{**train[0], "mask_directory": "masks"}]
    assert "`datasets.train[0].mask_directory` is set but masked training is off" in problems(
        {"datasets": {"train": with_masks}})
    assert "`unmasked_weight` has no effect without `use_masked_training_with_prior = true`" in problems(
        {"unmasked_weight": 0.2, "datasets": {"train": train}})
    text = problems({"use_masked_training_with_prior": True, "datasets": {
        "general": {"mask_directory": "masks"}, "train": train, "val": [{"image_directory": "v", "cache_directory": "cv"}]}})
    assert "`datasets.val[0]` has a `mask_directory`" in text
    assert "unmasked_weight" in problems({"use_masked_training_with_prior": True, "unmasked_weight": 1.5,
                                          "datasets": {"train": with_masks}})
    ok = parse_config({"use_masked_training_with_prior": True, "unmasked_weight": 0.1,
                       "masked_prior_preservation_weight": 0.5, "datasets": {"train": with_masks}}, config_dir=tmp_path)
    assert ok.masked_training.unmasked_weight == 0.1


def test_a_dataset_without_masks_trains_unmasked_and_leftover_mask_files_are_not_read(masked, tmp_path):
    values = masked.values(tmp_path / "out", "half", max_train_steps=4)
    plain = dict(values["datasets"]["train"][0])
    plain.pop("mask_directory")
    plain["cache_directory"] = str(masked.caches["ones"])  # holds mask caches of ones from another config
    values["datasets"]["train"].append(plain)
    trainer = build_trainer(load(write_config(tmp_path / "config.toml", values)))
    by_dataset = {}
    for item in trainer.loader.items:
        by_dataset.setdefault(item.dataset_index, []).append(dict(item.extra_paths)["mask"])
    assert all(p is not None for p in by_dataset[0]) and by_dataset[1] == [None] * len(by_dataset[1])
    batch = next(b for b in trainer.loader if b["item_extras"]["mask"] == [None] * len(b["keys"]))
    ctx = _step_context(trainer, batch, (trainer.noise_gen.get_state(), trainer.timestep_gen.get_state()))
    assert trainer.enhancements[0].loss_weight(ctx) is None  # that batch trains unmasked
    assert trainer.train() == "completed"


def test_loss_weight_of_a_mixed_list_of_masks():
    from wantrainer.enhancements.base import StepContext
    from wantrainer.enhancements.masked_training.config import MaskedTrainingConfig
    from wantrainer.enhancements.masked_training.masked_training_helper import MaskedTraining

    pred = torch.zeros(2, 16, 1, 2, 2)
    half = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    ctx = StepContext(batch={"item_extras": {"mask": [half, None]}}, latents=pred, noise=pred, noisy=pred,
                      target=pred, t=torch.zeros(2), timesteps=torch.zeros(2), pred=pred)
    feature = MaskedTraining(MaskedTrainingConfig(use_masked_training_with_prior=True, unmasked_weight=0.25), None)
    weight = feature.loss_weight(ctx)
    assert weight.shape == (2, 1, 1, 2, 2)
    assert weight[0, 0, 0].tolist() == [[1.0, 0.25], [1.0, 0.25]] and bool((weight[1] == 1).all())
    assert feature.get_masked_training_metrics() == {"coverage": 0.75}
    ctx.batch["item_extras"]["mask"] = [None, None]
    assert feature.loss_weight(ctx) is None


def test_validate_names_a_missing_mask_folder_and_lists_the_masks(masked, tmp_path, capsys):
    from wantrainer.cli import main

    values = masked.values(tmp_path / "out", "half")
    config = write_config(tmp_path / "config.toml", values)
    assert main(["validate", "--config", str(config)]) == 0
    assert f"masks {masked.masks['half']} (mask_missing = \"skip\")" in capsys.readouterr().out
    values["datasets"]["train"][0]["mask_directory"] = str(tmp_path / "nowhere")
    assert main(["validate", "--config", str(write_config(tmp_path / "bad.toml", values))]) == 2
    captured = capsys.readouterr()
    assert f"`datasets.train[0].mask_directory` = {tmp_path / 'nowhere'} does not exist" in captured.out + captured.err
    assert "Traceback" not in captured.err


def test_normalize_masked_area_loss_averages_over_the_learnt_area(masked, tmp_path):
    losses = {}
    for normalize in (False, True):
        trainer = masked.trainer(tmp_path / str(normalize), "half", normalize_masked_area_loss=normalize)
        draws = trainer.noise_gen.get_state(), trainer.timestep_gen.get_state()
        ctx = _step_context(trainer, next(iter(trainer.loader)), draws)
        losses[normalize] = float(trainer.compute_loss(ctx)[0].detach())
        if normalize:  # = the mean squared error over the masked cells only (weighting_scheme "none")
            inside = ctx.item_extra("mask").unsqueeze(1).expand_as(ctx.pred).bool()
            per_item = [((p - t)[m]).square().mean() for p, t, m in zip(ctx.pred.detach(), ctx.target, inside)]
            assert losses[True] == pytest.approx(float(torch.stack(per_item).mean()), rel=1e-5)
    assert losses[True] == pytest.approx(2 * losses[False], rel=1e-6)  # half of each frame is learnt
