"""The enhancement mechanism: discovery of feature folders, one schema, and every hook of the protocol on the kit."""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_support import load, write_config
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.enhancements import registry
from wantrainer.enhancements.base import BaseEnhancement, ExtraSave, ItemCache, PixelCache, network_disabled
from wantrainer.enhancements.registry import register, unregister
from wantrainer.errors import UserError

# -- discovery ------------------------------------------------------------------------------------------------


def _feature_package(root, name="probe_pkg"):
    """A package laid out like ``enhancements/``: one feature folder with a config section and a helper."""
    folder = root / name / "demo"
    folder.mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (folder / "config.py").write_text(textwrap.dedent('''
        from wantrainer.config.base import Section

        class DemoConfig(Section):
            demo_strength: float = 0.0
            """How strong the demo is."""

        SECTION = DemoConfig
    '''))
    (folder / "demo_helper.py").write_text(textwrap.dedent('''
        from wantrainer.enhancements.base import BaseEnhancement
        from wantrainer.enhancements.registry import register

        @register("demo_probe")
        class Demo(BaseEnhancement):
            pass
    '''))
    (root / name / "_private").mkdir()
    (root / name / "_private" / "__init__.py").write_text("")
    return name


def test_feature_folders_are_discovered_with_their_section_and_one_registration_line(tmp_path, monkeypatch):
    package = _feature_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PACKAGE", package)
    assert registry.feature_folders() == ["demo"]
    sections = registry.feature_sections()
    assert list(sections) == ["demo"] and "demo_strength" in sections["demo"].model_fields
    assert f"{package}.demo.demo_helper" not in sys.modules  # the schema never imports a helper
    try:
        assert "demo_probe" in registry.registered()
    finally:
        unregister("demo_probe")


def test_composed_schema_rejects_a_key_that_a_core_section_owns(monkeypatch):
    from wantrainer import config
    from wantrainer.config.base import Section

    class Clash(Section):
        learning_rate: float = 1.0
        """A clash."""

    monkeypatch.setattr(registry, "feature_sections", lambda: {"clash": Clash})
    with pytest.raises(ValueError, match="learning_rate"):
        config._compose()


def test_two_classes_cannot_take_one_name():
    class A(BaseEnhancement):
        pass

    class B(BaseEnhancement):
        pass

    register("test_dup")(A)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register("test_dup")(B)
    finally:
        unregister("test_dup")


# -- the hooks on the kit --------------------------------------------------------------------------------------


class _Probe(BaseEnhancement):
    """Exercises every hook; what it does is set per test through class attributes."""

    save_suffixes = ("-probe",)
    weight: float | None = None
    extra_cache: ItemCache | None = None
    pixel_cache: PixelCache | None = None
    seen: list = []

    def __init__(self):
        self.steps = 0
        self.handle = None
        self.networks = {}

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def item_caches(self):
        return [self.extra_cache] if self.extra_cache else []

    def pixel_caches(self):
        return [self.pixel_cache] if self.pixel_cache else []

    def setup_hooks(self, run):
        self.networks = run.networks
        self.handle = run.model.blocks[0].register_forward_hook(lambda m, i, o: None)

    def remove_hooks(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def loss_weight(self, ctx):
        return None if self.weight is None else torch.full_like(ctx.pred[:, :1], self.weight)

    def loss(self, ctx):
        if self.extra_cache is not None:
            self.seen.append(ctx.item_extra(self.extra_cache.name))
        with torch.no_grad(), ctx.network_disabled():
            base = ctx.predict()
        self.seen.append(("base", base, ctx.pred.detach()))
        return None, {}

    def on_step_end(self, step):
        if not step.skipped:
            self.steps += 1

    def get_probe_metrics(self):
        return {"steps": self.steps}

    def extra_saves(self, save):
        sd = {k: v * 2 for k, v in self.networks[save.network].state_dict().items()}
        return [ExtraSave("-probe", sd, {"ss_probe": str(self.steps)})]

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


@pytest.fixture
def probe():
    _Probe.weight, _Probe.extra_cache, _Probe.pixel_cache, _Probe.seen = None, None, None, []
    register("probe")(_Probe)
    yield _Probe
    unregister("probe")


def _train(cfg):
    trainer = build_trainer(cfg)
    assert trainer.train() == "completed"
    return trainer


def _lora(path):
    return load_file(str(path))


def test_a_feature_that_changes_nothing_keeps_the_trajectory_bit_for_bit(train_workspace, tmp_path, probe,
                                                                       monkeypatch):
    _train(load(train_workspace.write(tmp_path / "a", max_train_steps=3, log_with="none")))
    with_probe = _lora(tmp_path / "a" / "out" / "lora.safetensors")
    monkeypatch.setattr(registry, "build_enhancements", lambda cfg: [])
    _train(load(train_workspace.write(tmp_path / "b", max_train_steps=3, log_with="none")))
    without = _lora(tmp_path / "b" / "out" / "lora.safetensors")
    assert with_probe.keys() == without.keys()
    assert all(torch.equal(with_probe[k], without[k]) for k in without)


def test_loss_weight_multiplies_the_element_loss(train_workspace, tmp_path, probe):
    probe.weight = 1.0
    _train(load(train_workspace.write(tmp_path / "one", max_train_steps=2, log_with="none")))
    probe.weight = None
    _train(load(train_workspace.write(tmp_path / "none", max_train_steps=2, log_with="none")))
    one, none = (_lora(tmp_path / n / "out" / "lora.safetensors") for n in ("one", "none"))
    assert all(torch.equal(one[k], none[k]) for k in none)  # a weight of ones changes nothing
    probe.weight = 3.0
    cfg = load(train_workspace.write(tmp_path / "w", max_train_steps=1, log_with="none"))
    trainer = build_trainer(cfg)
    batch = next(iter(trainer.loader))
    draws = trainer.noise_gen.get_state(), trainer.timestep_gen.get_state()
    loss3, _ = trainer.forward_backward(batch, trainer.experts.names[0])
    probe.weight = None
    trainer.noise_gen.set_state(draws[0])
    trainer.timestep_gen.set_state(draws[1])
    loss1, _ = trainer.forward_backward(batch, trainer.experts.names[0])
    assert float(loss3) / float(loss1) == pytest.approx(3.0, rel=1e-5)


def test_network_disabled_gives_the_base_prediction_and_hooks_come_off(train_workspace, tmp_path, probe):
    cfg = load(train_workspace.write(tmp_path, max_train_steps=2, learning_rate=5e-2, log_with="none"))
    trainer = build_trainer(cfg)
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.train() == "completed"
    _, base, pred = probe.seen[-1]
    network = trainer.networks["default"]
    x = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    text = [torch.randn(5, model.config.text_dim, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        on = trainer.call_model(model, x, t, text)
        with network_disabled(network):
            off = trainer.call_model(model, x, t, text)
        network.remove()
        plain = trainer.call_model(model, x, t, text)
    assert not torch.equal(on, off) and torch.equal(off, plain)  # off = the DiT without its LoRA, exactly
    assert not torch.equal(base, pred)  # the plug-in's no-grad base forward inside the loop
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.blocks[0]._forward_hooks  # remove_hooks ran


def test_metrics_extra_saves_and_state(train_workspace, tmp_path, probe):
    cfg = load(train_workspace.write(tmp_path, max_train_steps=4, save_every_n_steps=2, save_state=True,
                                     save_last_n_steps=1, log_with="none"))
    trainer = _train(cfg)
    out = tmp_path / "out"
    assert trainer.last_step.metrics["probe/steps"] == 4.0
    assert trainer.progress_postfix["probe/steps"] == "4"
    lora, extra = _lora(out / "lora.safetensors"), _lora(out / "lora-probe.safetensors")
    assert all(torch.allclose(extra[k], 2 * lora[k]) for k in lora if not k.endswith(".alpha"))
    from safetensors import safe_open

    with safe_open(str(out / "lora-probe.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_probe"] == "4"
    assert (out / "lora-step00000002-probe.safetensors").is_file()
    state = out / "lora-step00000002-state"
    cfg2 = load(train_workspace.write(tmp_path / "r", max_train_steps=4, resume=str(state), log_with="none"))
    resumed = build_trainer(cfg2)
    resumed.load_checkpoint(state)
    assert resumed.enhancements[0].steps == 2
    # an earlier run's extra files count as its saves (a fresh run over them is refused, overwrite deletes them)
    from wantrainer.core.run_folder import earlier_saves

    (out / "lora-probe.safetensors").rename(out / "lora-step00000009-probe.safetensors")
    for path in [*out.glob("lora*.safetensors"), *out.glob("lora*-state")]:
        if "probe" not in path.name:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert [p.name for p in earlier_saves(out, "lora")] == ["lora-step00000002-probe.safetensors",
                                                            "lora-step00000009-probe.safetensors"]


def test_item_caches_reach_the_batch_and_missing_files_skip_items(train_workspace, tmp_path, probe):
    cache = shutil.copytree(train_workspace.train_cache, tmp_path / "cache")
    latents = sorted(p for p in cache.glob("*_wan.safetensors"))
    for i, path in enumerate(latents[:-1]):
        save_file({"probe": torch.full((2,), float(i))}, str(path.with_name(path.stem + "_wtprobe.safetensors")))
    probe.extra_cache = ItemCache("probe", "_wtprobe")
    values = train_workspace.config(tmp_path / "out", max_train_steps=2, log_with="none")
    values["datasets"]["train"][0]["cache_directory"] = str(cache)
    trainer = build_trainer(load(write_config(tmp_path / "c.toml", values)))
    assert len(trainer.loader.items) == len(latents) - 1  # the item without the file is left out
    assert "_wtprobe" in trainer.loader.reports[0].missing_extra
    assert trainer.train() == "completed"
    tensors = [s for s in probe.seen if isinstance(s, torch.Tensor)]
    assert tensors and all(t.shape[1:] == (2,) for t in tensors)
    probe.seen, probe.extra_cache = [], ItemCache("probe", "_wtprobe", missing="none")
    trainer = build_trainer(load(write_config(tmp_path / "d.toml", {**values, "output_dir": str(tmp_path / "o2")})))
    assert len(trainer.loader.items) == len(latents)
    trainer.train()
    lists = [s for s in probe.seen if isinstance(s, list)]
    assert any(v is None for s in lists for v in s)


def test_pixel_caches_are_written_by_cache_latents_reused_and_stale_when_their_signature_changes(
        train_workspace, tmp_path, probe):
    from dataclasses import replace

    from wantrainer.caching.cache_latents import cache_latents

    cache = shutil.copytree(train_workspace.train_cache, tmp_path / "cache")
    loads = []

    def load_encoder(device):
        loads.append(device)
        return lambda pixels: pixels.mean(dim=(1, 3, 4))  # [B, 3, F, H, W] -> [B, F]: a per-frame mean

    probe.pixel_cache = PixelCache("probe", "_wtpix", "mean", {"probe_encoder": "a"}, load_encoder)
    probe.extra_cache = probe.pixel_cache.item_cache()
    kit = train_workspace.kit
    values = train_workspace.config(tmp_path / "out", max_train_steps=1, log_with="none", vae=str(kit.vae))
    values["datasets"]["train"][0]["cache_directory"] = str(cache)
    cfg = load(write_config(tmp_path / "c.toml", values))
    summary = cache_latents(cfg)
    assert summary.skipped == 4 and summary.cached == 0  # the latents are current: only the new files are made
    assert summary.extras["probe"] == {"cached": 4, "skipped": 0, "stale": 0} and len(loads) == 1
    files = sorted(cache.glob("*_wan_wtpix.safetensors"))
    assert len(files) == 4 and "probe caches: 4 cached" in "\n".join(summary.lines())
    values_on_disk = [load_file(str(f))["mean"] for f in files]
    assert all(v.shape == (1,) and -1 <= float(v) <= 1 for v in values_on_disk)
    assert len({float(v) for v in values_on_disk}) == 4  # computed from each item's own pixels
    summary = cache_latents(cfg)  # skip_existing: nothing is encoded, the encoder is not even loaded
    assert summary.extras["probe"] == {"cached": 0, "skipped": 4, "stale": 0} and len(loads) == 1
    assert len(build_trainer(cfg).loader.items) == 4
    probe.pixel_cache = replace(probe.pixel_cache, signature={"probe_encoder": "b"})
    probe.extra_cache = probe.pixel_cache.item_cache()
    with pytest.raises(UserError, match="_wtpix.*cache-latents"):  # stale files are not trained on
        build_trainer(cfg)
    summary = cache_latents(cfg)
    assert summary.extras["probe"] == {"cached": 4, "skipped": 0, "stale": 4}
    assert len(build_trainer(cfg).loader.items) == 4
    ghost = cache / "gone_0064x0064_wan_wtpix.safetensors"  # of media that is gone: an orphan
    shutil.copy(files[0], ghost)
    cache_latents(cfg)
    assert not ghost.exists() and all(f.exists() for f in files)


def test_full_finetune_cannot_be_switched_off():
    class Full:
        pass

    with pytest.raises(UserError, match="no adapter"), network_disabled(Full()):
        pass


@pytest.mark.parametrize("feature", ["ema", "dop", "slider", "repa", "self_correction"])
def test_each_feature_leaves_the_model_as_it_found_it(train_workspace, tmp_path, feature):
    """After a run with the feature on, the DiT is bit-identical, no hook is left and the multiplier is back at 1."""
    kit = train_workspace.kit
    values = {"ema": dict(enable_ema=True, ema_decay=0.5, validate_with_ema=True, val=True, validate_every_n_steps=2),
              "dop": dict(enable_dop=True, dop_prompt="blank"),
              "slider": dict(slider_pairs=[{"target": "a shape", "positive": "a red circle",
                                            "negative": "a blue square"}], t5=str(kit.t5),
                             t5_tokenizer=str(kit.tokenizer_dir)),
              "repa": dict(enable_repa=True, repa_encoder_name=str(kit.dinov2), repa_alignment_depth=1,
                           repa_projector_hidden_dim=32, crepa_enabled=True, vae=str(kit.vae)),
              "self_correction": dict(self_correction_enabled=True, self_correction_batch_ratio=1.0)}[feature]
    val = values.pop("val", False)
    data = train_workspace.config(tmp_path / "out", val=val, max_train_steps=2, learning_rate=5e-2, log_with="none",
                                  **values)
    cache = shutil.copytree(train_workspace.train_cache, tmp_path / "cache")
    data["datasets"]["train"][0]["cache_directory"] = str(cache)
    cfg = load(write_config(tmp_path / "c.toml", data))
    if feature == "slider":
        from wantrainer.caching.cache_text_encoder_outputs import cache_text

        cache_text(cfg)
    if feature == "repa":
        from wantrainer.caching.cache_latents import cache_latents

        cache_latents(cfg)  # the encoder features
    trainer = build_trainer(cfg)
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_before = {k: v.clone() for k, v in trainer.networks["default"].state_dict().items()}
    assert trainer.train() == "completed"
    assert any(e.name == feature for e in trainer.enhancements)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    network = trainer.networks["default"]
    assert network.multiplier == 1.0
    assert any(not torch.equal(lora_before[k], v) for k, v in network.state_dict().items())  # it did train
