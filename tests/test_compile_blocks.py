"""compile_blocks: a platform that cannot compile is a clear error before loading; compiled blocks train like
eager ones (LoRA, gradient checkpointing, block swap) and reuse one graph for every block."""

from __future__ import annotations

import pytest
import torch

from train_support import load, lora_tensors
from wantrainer.cli import main as cli_main
from wantrainer.core.handlers.base import Handler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.models.wan import compile as wan_compile

CANNOT_COMPILE = wan_compile.missing_compiler("cpu")
LOSS_RTOL = 1e-4
"""Compiled and eager steps agree to float32 rounding (inductor fuses and reorders the element-wise ops)."""
LORA_REL_L2 = 1e-3
"""The LoRA tensors after 3 steps, relative L2 distance per tensor."""


@pytest.fixture()
def no_cxx(monkeypatch):
    """A machine without a C++ compiler: inductor's compiler search finds nothing."""
    from torch._inductor import config

    monkeypatch.setattr(wan_compile, "_probed", set())
    with config.patch({"cpp.cxx": (None, "no-such-compiler-c++")}):  # torch's own patch (restored after)
        yield


def test_no_compiler_is_a_user_error_before_loading(train_workspace, tmp_path, no_cxx, capsys):
    assert "needs a C++ compiler" in wan_compile.missing_compiler("cpu")
    with pytest.raises(UserError, match="`compile_blocks = true`: torch.compile on the CPU needs a C"):
        wan_compile.require_compiler("cpu")
    path = train_workspace.write(tmp_path, compile_blocks=True, dit=str(tmp_path / "not_loaded.safetensors"))
    assert cli_main(["train", "--config", str(path)]) == 2  # before the (missing) DiT file is even opened
    err = capsys.readouterr().err
    assert "compile_blocks" in err and "C++ compiler" in err and "Traceback" not in err
    good = train_workspace.write(tmp_path / "v", compile_blocks=True)  # the kit's DiT: only the compiler is missing
    assert cli_main(["validate", "--config", str(good)]) != 0
    out = capsys.readouterr()
    assert "`compile_blocks = true`: torch.compile on the CPU needs a C++ compiler" in out.out + out.err


class Losses(Handler):
    name = "losses"

    def __init__(self):
        self.values: list[float] = []

    def on_step_end(self, trainer):
        self.values.append(trainer.last_step.loss)


@pytest.mark.slow
@pytest.mark.skipif(CANNOT_COMPILE is not None, reason=f"this machine cannot compile: {CANNOT_COMPILE}")
def test_compiled_blocks_train_like_eager(train_workspace, tmp_path, torch_one_thread):
    """3 LoRA steps with gradient checkpointing and block swap: the eager losses (1e-4) and LoRA (1e-3 rel. L2), and the
    graphs are shared by the blocks (a LoRA-wrapped Linear adds no per-block recompilation)."""
    from torch._dynamo.utils import counters

    common = dict(max_train_steps=3, gradient_checkpointing=True, blocks_to_swap=1, log_with="none")
    eager = Losses()
    build_trainer(load(train_workspace.write(tmp_path / "eager", **common)), extra_handlers=[eager]).train()
    torch._dynamo.reset()
    compiled = Losses()
    trainer = build_trainer(load(train_workspace.write(tmp_path / "compiled", compile_blocks=True, **common)),
                            extra_handlers=[compiled])
    counters.clear()  # after the start-up probe compilation
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in trainer.model.blocks)
    trainer.train()
    assert compiled.values == pytest.approx(eager.values, rel=LOSS_RTOL)
    a = lora_tensors(tmp_path / "eager/out/lora.safetensors")
    b = lora_tensors(tmp_path / "compiled/out/lora.safetensors")
    worst = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if a[k].norm() > 0)
    assert worst < LORA_REL_L2, worst  # Adam's normalised steps turn rounding into small relative changes
    # first block (input without grad) + the other one: 2 graphs for 2 blocks here, 2 for 30 blocks too
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert list(trainer.model.state_dict())[0] == "patch_embedding.weight"  # names unchanged by compiling


@pytest.mark.slow
@pytest.mark.skipif(CANNOT_COMPILE is not None, reason=f"this machine cannot compile: {CANNOT_COMPILE}")
def test_compiled_blocks_with_token_routing_match_eager(torch_one_thread):
    """4 blocks, TREAD over blocks 1..2 with per-token timesteps, checkpointing, block swap and LoRA: the compiled
    model's output and LoRA gradients are the eager ones; 3 graphs serve the 4 blocks (input without grad, full
    sequence, routed tokens) and nothing breaks the graphs."""
    from torch._dynamo.utils import counters

    from wantrainer.config.training import NetworkConfig
    from wantrainer.models.wan.configs import WanModelConfig
    from wantrainer.models.wan.token_routing import TokenRoute
    from wantrainer.models.wan.transformer import WanModel
    from wantrainer.networks.lora_wan import create_network

    def build():
        torch.manual_seed(0)
        model = WanModel(WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=4, text_dim=64))
        model.requires_grad_(False)
        network = create_network(NetworkConfig(network_dim=4, network_alpha=4.0), model)
        network.apply_to(model)
        with torch.no_grad():
            for module in network.lora_modules:
                module.lora_up.weight.normal_(0, 0.01)
        model.enable_gradient_checkpointing()
        model.enable_token_routing(TokenRoute(0.5, 1, 2))
        model.enable_block_swap(1, "cpu")
        return model.train(), network

    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 2, 16, 16, generator=gen), torch.rand(2, 2 * 8 * 8, generator=gen) * 1000
    context = [torch.randn(5, 64, generator=gen), torch.randn(9, 64, generator=gen)]

    def step(model, network):
        torch.manual_seed(3)  # the same routed subsets
        out = model(x, t, context)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in network.parameters()]

    want, want_grads = step(*build())
    model, network = build()
    wan_compile.compile_blocks(model.blocks)
    torch._dynamo.reset()
    counters.clear()
    got, grads = step(model, network)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(grads, want_grads)) < 1e-4
    assert counters["stats"]["unique_graphs"] == 3 and sum(counters["graph_break"].values()) == 0
