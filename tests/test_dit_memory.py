"""DiT memory features on CPU: gradient checkpointing (+ CPU offload), block swap, fp8 storage."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wantrainer.config.training import NetworkConfig
from wantrainer.errors import UserError
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.fp8 import FP8_DTYPE, FP8Linear, replace_block_linears
from wantrainer.models.wan.loading import load_wan_dit
from wantrainer.models.wan.offloading import TO_CPU, TO_DEVICE
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.lora_wan import create_network

TINY4 = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=4, text_dim=64)


def make_inputs(seed=0, per_token=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    t = torch.rand(2, 32, generator=gen) * 1000 if per_token else torch.tensor([150.0, 700.0])
    return x, t, [torch.randn(5, 64, generator=gen), torch.randn(9, 64, generator=gen)]


def loss_and_grads(model, inputs, params):
    for p in params:
        p.grad = None
    loss = model(*inputs).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return WanModel(TINY4)


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["plain", "cpu_offload"])
def test_gradient_checkpointing_same_loss_and_grads(cpu_offload):
    model = fresh_model()
    params = list(model.parameters())
    inputs = make_inputs(per_token=cpu_offload)
    ref_loss, ref_grads = loss_and_grads(model, inputs, params)
    model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
    loss, grads = loss_and_grads(model, inputs, params)
    assert torch.equal(loss, ref_loss)
    for name_p, g, r in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7), name_p[0]
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing


def _with_lora(model, seed=1):
    model.requires_grad_(False)
    network = create_network(NetworkConfig(network_dim=4, network_alpha=4.0), model)
    network.apply_to(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero up weights so both LoRA matrices get gradients
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return network


@pytest.mark.parametrize("checkpointing", ["off", "on", "cpu_offload"])
def test_block_swap_same_outputs_grads_and_move_order(checkpointing):
    model = fresh_model()
    network = _with_lora(model)
    params = list(network.parameters())
    inputs = make_inputs(per_token=checkpointing == "cpu_offload")
    if checkpointing != "off":
        model.enable_gradient_checkpointing(cpu_offload=checkpointing == "cpu_offload")
    ref_loss, ref_grads = loss_and_grads(model, inputs, params)

    model.enable_block_swap(2, "cpu")
    model.move_to_device_except_swap_blocks("cpu")
    loss, grads = loss_and_grads(model, inputs, params)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    moves = model.block_swapper.moves
    assert moves == [
        ("forward", TO_CPU, 0), ("forward", TO_DEVICE, 2),
        ("forward", TO_CPU, 1), ("forward", TO_DEVICE, 3),
        ("backward", TO_CPU, 3), ("backward", TO_DEVICE, 1),
        ("backward", TO_CPU, 2), ("backward", TO_DEVICE, 0),
    ]  # fmt: skip
    # the next forward starts from where the backward left the blocks: nothing to prepare
    with torch.no_grad():
        out = model(*inputs)
    assert model.block_swapper.moves[:2] == [("forward", TO_CPU, 0), ("forward", TO_DEVICE, 2)]
    # after a forward without backward the blocks are put back before the next forward
    with torch.no_grad():
        assert torch.equal(model(*inputs), out)
    assert [m for m in model.block_swapper.moves if m[0] == "prepare"] == [
        ("prepare", TO_DEVICE, 0), ("prepare", TO_DEVICE, 1), ("prepare", TO_CPU, 2), ("prepare", TO_CPU, 3)
    ]  # fmt: skip


def test_block_swap_moves_only_the_block_tensors():
    model = fresh_model()
    network = _with_lora(model)
    model.enable_block_swap(1, "cpu")
    model.move_to_device_except_swap_blocks("cpu")
    model(*make_inputs()).mean().backward()
    swapper = model.block_swapper
    assert len(swapper.moves) == 4  # forward: 0 out, 3 in; backward: 3 out, 0 in
    block_bytes = sum(t.nbytes for t in list(model.blocks[0].parameters()) + list(model.blocks[0].buffers()))
    lora_bytes = sum(p.nbytes for p in network.parameters()) // 4  # LoRA of one block
    assert lora_bytes > 0
    # the LoRA wraps the block's Linear layers but none of its tensors travel with the block
    assert swapper.bytes_moved == 4 * block_bytes


@pytest.mark.parametrize("num", [0, 4, 7])
def test_block_swap_validated(num):
    model = fresh_model()
    if num == 0:
        model.enable_block_swap(0, "cpu")
        assert model.block_swapper is None
        return
    with pytest.raises(UserError, match="1 to 3"):
        model.enable_block_swap(num, "cpu")


def _save(model, path, dtype):
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, path)


def test_fp8_scaled_close_to_bf16_and_half_the_bytes(tmp_path):
    model = fresh_model(seed=3)
    _save(model, tmp_path / "bf16.safetensors", torch.bfloat16)
    # the bf16 weights computed in fp32 (no bf16 matmul on CPU) are the reference
    bf16 = load_wan_dit(tmp_path / "bf16.safetensors", dtype=torch.float32)
    scaled = load_wan_dit(tmp_path / "bf16.safetensors", dtype=torch.float32, fp8_scaled=True)
    plain = load_wan_dit(tmp_path / "bf16.safetensors", dtype=torch.float32, fp8_base=True)
    linear = scaled.blocks[0].ffn[0]
    assert isinstance(linear, FP8Linear) and linear.weight.dtype == FP8_DTYPE
    assert linear.scale_weight.shape == (256,)
    assert (
        scaled.head.head.weight.dtype == torch.float32 and scaled.blocks[0].modulation.dtype == torch.float32
    )
    inputs = make_inputs(seed=4)
    with torch.no_grad():
        ref, out_scaled, out_plain = bf16(*inputs), scaled(*inputs), plain(*inputs)
    rel_scaled = ((out_scaled - ref).norm() / ref.norm()).item()
    rel_plain = ((out_plain - ref).norm() / ref.norm()).item()
    assert 0 < rel_scaled < 0.02  # measured 0.006 relative L2 (e4m3 keeps a 3-bit mantissa)
    assert rel_plain < 0.05
    # block Linear weight bytes: fp8 is exactly half of bf16; scales add one float per output channel
    bf16_model = load_wan_dit(tmp_path / "bf16.safetensors")

    def block_linear_bytes(m):
        return sum(mod.weight.nbytes for mod in m.blocks.modules() if isinstance(mod, torch.nn.Linear))

    assert block_linear_bytes(scaled) * 2 == block_linear_bytes(bf16_model)
    total = sum(t.nbytes for t in scaled.state_dict().values() if t.dtype == FP8_DTYPE)
    assert total * 2 == block_linear_bytes(bf16_model)


def test_fp8_scaled_state_dict_round_trip(tmp_path):
    model = fresh_model(seed=5)
    replace_block_linears(model, scaled=True)
    sd = model.state_dict()
    assert "blocks.0.self_attn.q.scale_weight" in sd
    save_file(
        {f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / "fp8.safetensors"
    )
    loaded = load_wan_dit(tmp_path / "fp8.safetensors")  # stored fp8 + scales: kept as stored
    assert isinstance(loaded.blocks[1].cross_attn.v, FP8Linear)
    assert loaded.blocks[1].cross_attn.v.scale_weight is not None
    inputs = make_inputs(seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))
    upcast = load_wan_dit(tmp_path / "fp8.safetensors", dtype=torch.float32)  # dequantised to fp32 Linear
    assert type(upcast.blocks[1].cross_attn.v) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(upcast(*inputs), model(*inputs), atol=1e-5)


def test_fp8_with_lora_trains_lora_only():
    model = fresh_model(seed=7)
    replace_block_linears(model, scaled=True)
    network = _with_lora(model)
    model(*make_inputs()).square().mean().backward()
    assert all(p.grad is not None for p in network.parameters())
    assert model.blocks[0].ffn[0].weight.grad is None
