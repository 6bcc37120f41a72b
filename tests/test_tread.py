"""TREAD token routing: kept tokens keep their positions, routed ones rejoin unchanged, the full sequence outside
training, the same result under checkpointing / block swap, off = no routing at all, and training learns with it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from diffusers_support import TINY
from train_support import load, lora_tensors
from wantrainer.core.handlers.validation import ValidationHandler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.models.wan.token_routing import TokenRoute
from wantrainer.models.wan.transformer import WanModel

FRAMES, HEIGHT, WIDTH = 3, 8, 12  # latent size -> a (3, 4, 6) patch grid
GRID = (FRAMES, HEIGHT // 2, WIDTH // 2)


@dataclass(frozen=True)
class FixedRoute(TokenRoute):
    """A route whose kept tokens are given (the same for every sample) instead of drawn."""

    kept: tuple[int, ...] = ()

    def choose(self, batch, seq_len, device):
        return torch.tensor(self.kept, device=device).expand(batch, -1)


def sub_box_tokens() -> list[int]:
    """Flat token indices of the patch-grid box frames 1.., columns 3.. (all rows)."""
    f, h, w = GRID
    return [(i * h + j) * w + k for i in range(1, f) for j in range(h) for k in range(w // 2, w)]


def tiny_model(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(TINY)
    with torch.no_grad():  # random biases / norm weights so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, FRAMES, HEIGHT, WIDTH, generator=gen)
    context = [torch.randn(5, 64, generator=gen), torch.randn(11, 64, generator=gen)]
    return x, context


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample_t", "per_token_t"])
def test_kept_tokens_see_their_own_3d_positions(per_token):
    """Routing every block, the kept tokens of a sub-box give what the model gives on that box cropped out of
    the latents (RoPE depends on relative positions only), and the routed tokens skip every block."""
    model = tiny_model()
    x, context = inputs()
    seq_len = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
    gen = torch.Generator().manual_seed(5)
    t = torch.rand(2, seq_len, generator=gen) * 1000 if per_token else torch.tensor([250.0, 800.0])
    kept = sub_box_tokens()
    model.enable_token_routing(FixedRoute(0.5, 0, len(model.blocks) - 1, kept=tuple(kept)))
    routed = model(x, t, context)  # [B, C, F, H, W]
    crop = x[:, :, 1:, :, WIDTH // 2:]
    t_crop = t.unflatten(1, GRID)[:, 1:, :, GRID[2] // 2:].flatten(1) if per_token else t
    with torch.no_grad():
        want = model.eval()(crop, t_crop, context)
    model.train()
    got = routed[:, :, 1:, :, WIDTH // 2:]
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    # every other column: the kept tokens are 2 columns apart, unlike in the latents cropped to those columns
    f, h, w = GRID
    spaced = [(i * h + j) * w + k for i in range(f) for j in range(h) for k in range(0, w, 2)]
    model.enable_token_routing(FixedRoute(0.5, 0, len(model.blocks) - 1, kept=tuple(spaced)))
    columns = torch.tensor([c for k in range(0, w, 2) for c in (2 * k, 2 * k + 1)])
    t_cols = t.unflatten(1, GRID)[:, :, :, ::2].flatten(1) if per_token else t
    with torch.no_grad():
        compact = model.eval()(x[..., columns], t_cols, context)
    model.train()
    spaced_out = model(x, t, context)[..., columns]
    assert (spaced_out - compact).abs().max().item() > 1e-2 * compact.abs().max().item()
    model.enable_token_routing(FixedRoute(0.5, 0, len(model.blocks) - 1, kept=tuple(kept)))
    # the routed tokens never went through a block: changing the blocks leaves them unchanged
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    again = model(x, t, context)
    mask = torch.ones(2, 16, FRAMES, HEIGHT, WIDTH, dtype=torch.bool)
    mask[:, :, 1:, :, WIDTH // 2:] = False
    assert torch.equal(again[mask], routed[mask])
    assert (again[~mask] - routed[~mask]).abs().max().item() > 1e-3


def test_full_sequence_outside_training_and_exact_without_route():
    model = tiny_model()
    x, context = inputs()
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        plain = model(x, t, context)
    model.enable_token_routing(TokenRoute(0.5, 0, 0))
    with torch.no_grad():
        assert torch.equal(model(x, t, context), plain)  # training mode, autograd off (validation)
    model.eval()
    assert torch.equal(model(x, t, context), plain)  # eval mode, autograd on
    model.train()
    torch.manual_seed(0)
    assert (model(x, t, context) - plain).abs().max().item() > 1e-2  # a training pass routes


def _grads(model, x, t, context, seed=3):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    out = model(x, t, context)
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_result_with_checkpointing_offload_and_block_swap():
    """The routed subset is drawn outside the checkpointed blocks: recomputation, CPU offload of the block
    inputs and block swap give the plain run's output and gradients."""
    model = tiny_model()
    model.enable_token_routing(TokenRoute(0.5, 1, 1))
    x, context = inputs()
    t = torch.rand(2, FRAMES * (HEIGHT // 2) * (WIDTH // 2)) * 1000  # per-token (TI2V style)
    want_out, want = _grads(model, x, t, context)
    assert want["blocks.1.ffn.0.weight"].abs().sum() > 0 and want["blocks.0.ffn.0.weight"].abs().sum() > 0
    for setup in ("checkpoint", "offload", "swap"):
        other = tiny_model()
        other.enable_token_routing(TokenRoute(0.5, 1, 1))
        if setup == "swap":
            other.enable_block_swap(1, "cpu")
        else:
            other.enable_gradient_checkpointing(cpu_offload=setup == "offload")
        out, got = _grads(other, x, t, context)
        assert torch.allclose(out, want_out, atol=1e-6), setup
        assert got.keys() == want.keys(), setup
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), (setup, name)


def test_route_from_keys_and_user_errors():
    assert TokenRoute.from_keys(0.0, 2, -2, 30) is None
    assert TokenRoute.from_keys(0.5, 2, -2, 30) == TokenRoute(0.5, 2, 28)
    assert TokenRoute(0.5, 0, 0).kept_count(16) == 8 and TokenRoute(0.999, 0, 0).kept_count(4) == 1
    with pytest.raises(UserError, match="tread_start_layer_idx` = 2, `tread_end_layer_idx` = -2"):
        TokenRoute.from_keys(0.5, 2, -2, 2)  # the tiny kit's 2 blocks
    keep = TokenRoute(0.25, 0, 0).choose(3, 16, torch.device("cpu"))
    assert keep.shape == (3, 12) and all(len(set(row.tolist())) == 12 for row in keep)
    assert torch.equal(keep, keep.sort(dim=1).values)


def test_config_checks(train_workspace, tmp_path):
    from wantrainer.config_parser import ConfigError

    with pytest.raises(ConfigError, match="tread_end_layer_idx` = 3 has no effect"):
        load(train_workspace.write(tmp_path, tread_end_layer_idx=3))
    with pytest.raises(ConfigError, match="tread_start_layer_idx` = 4 is after"):
        load(train_workspace.write(tmp_path, tread_selection_ratio=0.5, tread_start_layer_idx=4,
                                   tread_end_layer_idx=1))
    with pytest.raises(UserError, match="not a span of this DiT's 2 blocks"):
        build_trainer(load(train_workspace.write(tmp_path, tread_selection_ratio=0.5)))  # defaults 2..-2


def run(ws, folder, **values):
    values.setdefault("log_with", "none")
    trainer = build_trainer(load(ws.write(folder, **values)))
    return trainer, trainer.train()


def test_off_builds_no_route_and_an_empty_route_is_the_plain_run(train_workspace, tmp_path):
    """Off (the default) leaves the model without a route; a route that keeps every token (ratio too small to
    route one of the 16 tokens) goes through the gather / scatter path and gives the very same LoRA."""
    off, _ = run(train_workspace, tmp_path / "off", max_train_steps=3)
    assert off.model.token_route is None
    empty, _ = run(train_workspace, tmp_path / "empty", max_train_steps=3, tread_selection_ratio=0.01,
                   tread_start_layer_idx=0, tread_end_layer_idx=0)
    assert empty.model.token_route == TokenRoute(0.01, 0, 0)
    a, b = lora_tensors(tmp_path / "off/out/lora.safetensors"), lora_tensors(tmp_path / "empty/out/lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    routed, _ = run(train_workspace, tmp_path / "on", max_train_steps=3, tread_selection_ratio=0.5,
                    tread_start_layer_idx=0, tread_end_layer_idx=0)
    c = lora_tensors(tmp_path / "on/out/lora.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # routing changes what is learned


LEARN_STEPS = 40
LEARN_MARGIN = 0.07
"""Held-out loss must fall by at least 7 % with half the tokens routed around block 0 (it falls ~12 % off)."""


def test_learning_proof_with_routing(train_workspace, tmp_path):
    cfg = load(train_workspace.write(tmp_path, val=True, max_train_steps=LEARN_STEPS, learning_rate=1e-2,
                                     network_dim=8, network_alpha=8.0, log_with="none", validate_on_epoch_end=True,
                                     tread_selection_ratio=0.5,
                                     tread_start_layer_idx=0, tread_end_layer_idx=0))
    trainer = build_trainer(cfg)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)
    assert trainer.train() == "completed"
    after = probe.evaluate(trainer)
    print("held-out loss", before["val/loss"], "->", after["val/loss"])
    assert after["val/loss"] < (1 - LEARN_MARGIN) * before["val/loss"], (before, after)


def test_resume_with_routing_is_bit_identical(train_workspace, tmp_path):
    common = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, tread_selection_ratio=0.5,
                  tread_start_layer_idx=0, tread_end_layer_idx=0, network_dropout=0.1)
    run(train_workspace, tmp_path / "a", **common)
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    _, reason = run(train_workspace, tmp_path / "b", resume=str(state), **common)
    assert reason == "completed"
    a, b = lora_tensors(tmp_path / "a/out/lora.safetensors"), lora_tensors(tmp_path / "b/out/lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wan22_experts_and_image_to_video_train_with_routing(train_workspace, i2v_workspace, tmp_path):
    from train_support import write_config

    kit = train_workspace.kit
    trainer, reason = run(train_workspace, tmp_path / "w22", target_model="wan22", dit=str(kit.dit_wan22_low),
                          dit_high_noise=str(kit.dit_wan22_high), timestep_boundary=500, max_train_steps=4,
                          tread_selection_ratio=0.5, tread_start_layer_idx=1, tread_end_layer_idx=1)
    assert reason == "completed" and trainer.model.token_route == TokenRoute(0.5, 1, 1)
    assert set(trainer.state.expert_steps) == {"high_noise", "low_noise"}
    values = i2v_workspace.config("i2v", tmp_path / "i2v" / "out", max_train_steps=2, tread_selection_ratio=0.5,
                                  tread_start_layer_idx=0, tread_end_layer_idx=-1)
    cfg = load(write_config(tmp_path / "i2v" / "c.toml", values))
    trainer = build_trainer(cfg)
    assert trainer.train() == "completed" and trainer.model.token_route == TokenRoute(0.5, 0, 1)
    assert torch.isfinite(torch.tensor(trainer.last_step.loss))


def test_ti2v_per_token_timesteps_follow_the_kept_tokens(ti2v_workspace, tmp_path):
    """TI2V-5B (per-token timesteps, clean first frame): block 0 sees half the tokens with their own per-token
    modulation, block 1 the full sequence again."""
    trainer = build_trainer(load(ti2v_workspace.write(tmp_path, log_with="none", max_train_steps=2,
                                                      tread_selection_ratio=0.5, tread_start_layer_idx=0,
                                                      tread_end_layer_idx=0)))
    seen: dict[int, list[tuple[int, tuple[int, ...]]]] = {0: [], 1: []}
    for index in (0, 1):
        trainer.model.blocks[index].register_forward_pre_hook(
            lambda module, args, i=index: seen[i].append((args[0].shape[1], tuple(args[1].shape))))
    assert trainer.train() == "completed" and torch.isfinite(torch.tensor(trainer.last_step.loss))
    assert seen[0] and len(seen[0]) == len(seen[1])
    for (kept, e_kept), (full, e_full) in zip(seen[0], seen[1]):
        assert kept == TokenRoute(0.5, 0, 0).kept_count(full) and kept < full
        assert len(e_kept) == 4 and e_kept[1] == kept and e_full[1] == full  # [B, tokens, 6, dim]
