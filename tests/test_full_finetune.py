"""Full fine-tuning on the tiny kit: it learns, resumes bit for bit, and saves a DiT that our loader and diffusers'
converter read and that gives the trained model's output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffusers_support import diffusers_twin, random_inputs, twin_output
from train_support import load, write_config
from wantrainer.core.handlers.validation import ValidationHandler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.models.wan.loading import load_wan_dit

FULL = {"network_module": "full", "full_save_precision": "fp32", "full_save_comfyui_prefix": False}


ADAPTER_KEYS = ("network_dim", "network_alpha", "save_precision")


def full_config(ws, folder, *, val: bool = False, **values):
    """The trainer tests' base config without its LoRA keys, which a full fine-tune refuses."""
    values.setdefault("log_with", "none")
    config = ws.config(folder / "out", val=val, **values)
    for key in ADAPTER_KEYS:
        config.pop(key)
    return write_config(folder / "config.toml", config)


def run(ws, folder, **values):
    trainer = build_trainer(load(full_config(ws, folder, **values)))
    return trainer, trainer.train()


def inputs():
    return random_inputs(5, (1, 16, 1, 8, 8), [450.0], [7])


def test_saved_dit_loads_in_our_loader_and_diffusers_and_gives_the_trained_output(train_workspace, tmp_path):
    trainer, reason = run(train_workspace, tmp_path, max_train_steps=3, learning_rate=1e-3, **FULL)
    assert reason == "completed"
    x, t, ctx = inputs()
    with torch.no_grad():
        want = trainer.model.eval()(x, t, ctx)
    path = tmp_path / "out" / "lora.safetensors"
    raw = load_file(str(path))
    assert "blocks.0.self_attn.q.weight" in raw and all(v.dtype == torch.float32 for v in raw.values())
    loaded = load_wan_dit(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx), want, rtol=1e-5, atol=1e-6)
    ref = diffusers_twin(loaded)  # converted by diffusers' single-file converter from the file's tensors
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(raw)), strict=True)
    got = twin_output(ref, x, t, ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    base = load_wan_dit(train_workspace.kit.dit_wan21, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(x, t, ctx) - want).abs().max() > 1e-4  # it did train


def test_trainable_blocks_and_save_layout(train_workspace, tmp_path):
    trainer, _ = run(train_workspace, tmp_path, max_train_steps=2, learning_rate=1e-3, network_module="full",
                     trainable_blocks=["blocks\\.1\\..*"], full_save_precision="fp8_scaled")
    raw = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert raw["model.diffusion_model.blocks.1.ffn.0.weight"].dtype == torch.float8_e4m3fn
    assert "model.diffusion_model.scaled_fp8" in raw
    network = trainer.groups[0].network
    assert all(n.startswith("blocks.1.") for n in network.state_dict()) and len(network.state_dict()) > 10
    base = load_file(str(train_workspace.kit.dit_wan21))
    trained = dict(trainer.model.named_parameters())
    for key, value in base.items():
        name = key.removeprefix("model.diffusion_model.")
        if name in trained and not name.startswith("blocks.1."):
            assert torch.equal(trained[name].detach().to(value.dtype), value), name  # frozen: unchanged
    assert not torch.equal(trained["blocks.1.ffn.0.weight"].detach().to(torch.bfloat16),
                           base["model.diffusion_model.blocks.1.ffn.0.weight"])
    loaded = load_wan_dit(tmp_path / "out" / "lora.safetensors")  # fp8_scaled as stored
    x, t, ctx = inputs()
    with torch.no_grad():
        got, want = loaded(x, t, ctx), trainer.model.eval()(x, t, ctx)
    assert float((got - want).norm() / want.norm()) < 0.05  # fp8 rounding only


def test_bf16_weights_train_through_float32_masters():
    """A bf16 DiT: the optimiser works on float32 masters; each bf16 weight is its master rounded to nearest."""
    from test_adapters import inputs as small_inputs
    from test_adapters import tiny_dit
    from wantrainer.networks.full import FullNetwork

    dit = tiny_dit().to(torch.bfloat16).train()
    start = {k: v.detach().float().clone() for k, v in dit.named_parameters()}
    network = FullNetwork(dit, ["blocks\\.0\\.ffn\\..*"])
    network.apply_to(dit)
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(1e-5)[0]["params"], lr=1e-5)
    network.attach_optimizer(optimizer)
    x, t, ctx = small_inputs()
    for _ in range(2):
        out = dit(x.to(torch.bfloat16), t, [c.to(torch.bfloat16) for c in ctx])
        out.float().square().mean().backward()
        params = dict(dit.named_parameters())
        assert all(params[n].grad is None for n in network.names)  # moved into the float32 masters
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dit(x.to(torch.bfloat16), t, [c.to(torch.bfloat16) for c in ctx])  # the forward refreshes the bf16 weights
    masters = network.state_dict()
    assert set(masters) == {n for n in start if n.startswith("blocks.0.ffn.")}
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    params = dict(dit.named_parameters())
    lost = []
    for name, master in masters.items():
        assert master.dtype == torch.float32 and params[name].dtype == torch.bfloat16
        assert torch.equal(params[name].detach(), master.to(torch.bfloat16)), name
        moved = (master - start[name]).abs()
        assert float(moved.max()) > 0
        # below half a bf16 step of the weight: a pure-bf16 optimiser would have rounded this update away
        if master.ndim == 2:
            lost.append((moved < start[name].abs() * 2.0**-9).float().mean())
    assert float(torch.stack(lost).mean()) > 0.5, lost  # measured 0.92
    assert all(torch.equal(params[n].detach().float(), start[n]) for n in start if not n.startswith("blocks.0.ffn."))


def test_full_finetune_resume_is_bit_identical(train_workspace, tmp_path):
    common = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, learning_rate=1e-3,
                  optimizer_type="adafactor", **FULL)
    run(train_workspace, tmp_path / "a", **common)
    state = tmp_path / "a" / "out" / "lora-step00000002-state"
    _, reason = run(train_workspace, tmp_path / "b", resume=str(state), **common)
    assert reason == "completed"
    a = load_file(str(tmp_path / "a" / "out" / "lora.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mid = load_file(str(tmp_path / "a" / "out" / "lora-step00000002.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)


@pytest.mark.slow
def test_full_finetune_learning_proof(train_workspace, tmp_path):
    cfg = load(full_config(train_workspace, tmp_path, val=True, max_train_steps=40, learning_rate=1e-3,
                           validate_on_epoch_end=True, gradient_checkpointing=True, **FULL))
    trainer = build_trainer(cfg)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)
    assert trainer.train() == "completed"
    after = probe.evaluate(trainer)
    assert after["val/loss"] < 0.93 * before["val/loss"], (before, after)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"network_args": ["dora_wd=True"]}, "network_args"),
        ({"network_dim": 8}, "network_dim"),
        ({"fp8_base": True}, "fp8_base"),
        ({"blocks_to_swap": 1}, "blocks_to_swap"),
        ({"trainable_blocks": ["("]}, "bad regex"),
    ],
)
def test_full_finetune_mistakes(values, message):
    from wantrainer.config_parser import parse_config
    from wantrainer.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config({"network_module": "full", **values})


def test_lora_options_need_the_full_module():
    from wantrainer.config_parser import parse_config
    from wantrainer.errors import ConfigError

    with pytest.raises(ConfigError, match="trainable_blocks"):
        parse_config({"trainable_blocks": ["blocks\\.0\\..*"]})
    assert issubclass(ConfigError, UserError)
