"""Block Linear weights stored apart from the compute dtype (``dit_weight_dtype``): numbers, memory, LoRA, fp8."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from wantrainer.config.training import NetworkConfig
from wantrainer.core.handlers.base import Handler
from wantrainer.errors import UserError
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.fp8 import FP8_DTYPE, FP8Linear, quantize_weight
from wantrainer.models.wan.loading import load_wan_dit
from wantrainer.models.wan.stored_linear import StoredLinear, UpcastBuffers, upcast_weight_into
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.lora_wan import create_network

TINY4 = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=4, text_dim=64)
MODES = ("fp32", "bf16", "fp16", "fp8_scaled", "fp8")
# relative L2 of the DiT output against fp32 storage, measured on this model (LoRA gradients in brackets):
# bf16 3.9e-4 (2.1e-3), fp16 4.8e-5 (2.6e-4), fp8_scaled 6.2e-3 (3.2e-2), fp8 6.1e-3 (3.4e-2). Bounds ~2.5x.
REL_L2_BOUND = {"fp32": 0.0, "bf16": 1e-3, "fp16": 1.5e-4, "fp8_scaled": 0.015, "fp8": 0.02}


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    return x, torch.tensor([150.0, 700.0]), [torch.randn(5, 64, generator=gen), torch.randn(9, 64, generator=gen)]


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    torch.manual_seed(3)
    model = WanModel(TINY4)
    path = tmp_path_factory.mktemp("storage") / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def with_lora(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    network = create_network(NetworkConfig(network_dim=4, network_alpha=4.0), model, generator=gen)
    network.apply_to(model)
    with torch.no_grad():
        for module in network.lora_modules:
            module.lora_up.weight.normal_(0, 0.05, generator=gen)
    return network


def lora_step(model, network):
    out = model(*inputs())
    out.square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in network.parameters()])


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_each_storage_mode_against_fp32_with_lora(fp32_file):
    """The output and the LoRA gradients of each storage mode are within its precision of fp32 storage."""
    ref_model = load_wan_dit(fp32_file, dtype=torch.float32, weight_dtype="fp32")
    ref_out, ref_grad = lora_step(ref_model, with_lora(ref_model))
    measured = {}
    for mode in MODES:
        model = load_wan_dit(fp32_file, dtype=torch.float32, weight_dtype=mode)
        linear = model.blocks[0].ffn[0]
        if mode == "fp32":
            assert type(linear) is torch.nn.Linear
        else:
            assert isinstance(linear, StoredLinear) and linear.weight.dtype == {
                "bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, FP8_DTYPE)
        assert model.dtype == torch.float32 and model.head.head.weight.dtype == torch.float32
        network = with_lora(model)
        out, grad = lora_step(model, network)
        assert out.dtype == torch.float32
        assert linear.weight.grad is None  # the base stays frozen
        measured[mode] = (rel_l2(out, ref_out), rel_l2(grad, ref_grad))
    for mode, (out_err, grad_err) in measured.items():
        assert out_err <= REL_L2_BOUND[mode], (mode, measured)
        assert grad_err <= 6 * REL_L2_BOUND[mode], (mode, measured)
    assert measured["fp32"] == (0.0, 0.0)
    assert 0 < measured["fp16"][0] < measured["bf16"][0] < measured["fp8_scaled"][0]


def test_bf16_file_kept_in_bf16_is_bit_identical_to_fp32_copies(fp32_file, tmp_path):
    """A bf16 checkpoint computed in fp32: storing it as bf16 gives exactly what fp32 copies give (exact upcast)."""
    from safetensors.torch import load_file

    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(fp32_file)).items()}, bf16)
    copies = load_wan_dit(bf16, dtype=torch.float32)  # "auto": every weight converted to fp32
    kept = load_wan_dit(bf16, dtype=torch.float32, weight_dtype="bf16")
    assert copies.blocks[0].self_attn.q.weight.dtype == torch.float32
    assert kept.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    out_a, grad_a = lora_step(copies, with_lora(copies))
    out_b, grad_b = lora_step(kept, with_lora(kept))
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)

    def block_linear_bytes(m):
        return sum(mod.weight.nbytes for mod in m.blocks.modules() if isinstance(mod, torch.nn.Linear))

    assert block_linear_bytes(kept) * 2 == block_linear_bytes(copies)


def test_e4m3_cpu_upcast_is_exact_for_every_byte():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).reshape(16, 16)
    finite = ~torch.isnan(codes.float())
    scale = torch.rand(16, generator=torch.Generator().manual_seed(0)) + 0.01
    for dtype in (torch.float32, torch.bfloat16):
        out = upcast_weight_into(codes, scale, torch.empty(16, 16, dtype=dtype))
        ref = codes.to(dtype) * scale.to(dtype)[:, None]
        assert torch.equal(out[finite], ref[finite]), dtype
        plain = upcast_weight_into(codes, None, torch.empty(16, 16, dtype=dtype))
        assert torch.equal(plain[finite], codes.to(dtype)[finite])


@pytest.mark.parametrize("threads", [1, 2])
def test_e4m3_cpu_upcast_in_several_pieces(threads):
    """A weight larger than one piece (and not a whole number of them) is upcast exactly, each piece split over
    torch's threads."""
    from wantrainer.models.wan import stored_linear

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(2)
        rows = 2 * stored_linear._CPU_PIECE_PER_THREAD * threads // 96 + 5  # two pieces and a remainder
        weight, scale = quantize_weight(torch.randn(rows, 96, generator=gen) * 0.05, scaled=True)
        out = upcast_weight_into(weight, scale, torch.empty(rows, 96))
        assert torch.equal(out, weight.float() * scale[:, None])
    finally:
        torch.set_num_threads(before)


def test_upcast_buffer_is_reused_and_no_weight_copy_is_saved(fp32_file):
    """fp8 + LoRA + gradient checkpointing: after the first step no step allocates a weight buffer, the buffer
    keeps its address, and autograd saves no upcast weight (only activations)."""
    model = load_wan_dit(fp32_file, dtype=torch.float32, weight_dtype="fp8_scaled")
    model.enable_gradient_checkpointing()
    network = with_lora(model)
    buffers = model.upcast_buffers
    assert isinstance(buffers, UpcastBuffers) and all(
        m.upcast_buffers is buffers for m in model.modules() if isinstance(m, StoredLinear))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, StoredLinear)}
    saved_weight_like = []

    def pack(tensor):
        if tensor.ndim == 2 and tuple(tensor.shape) in weight_shapes and tensor.dtype == torch.float32:
            saved_weight_like.append(tuple(tensor.shape))
        return tensor

    counts, pointers = [], []
    for _ in range(5):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*inputs()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(buffers.allocations)
        pointers.append(buffers.get((1,), torch.float32, torch.device("cpu")).data_ptr())
    assert len(set(counts)) == 1 and counts[0] <= 2, counts  # grown at most once in the first step, then none
    assert len(set(pointers)) == 1
    assert buffers.nbytes() == max(r * c for r, c in weight_shapes) * 4  # one buffer, the largest weight
    assert saved_weight_like == []


def test_stored_linear_gradients_match_a_plain_linear():
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Linear(24, 40)
    with torch.no_grad():
        plain.weight.copy_(plain.weight.to(torch.bfloat16).float())  # values bf16 holds exactly
    stored = StoredLinear(24, 40, storage_dtype=torch.bfloat16)
    stored.upcast_buffers = UpcastBuffers()
    stored.weight.data = plain.weight.data.to(torch.bfloat16)
    stored.bias.data = plain.bias.data.clone()
    plain.weight.requires_grad_(False)
    x = torch.randn(3, 7, 24, generator=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    plain(x).sin().sum().backward()
    stored(x2).sin().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(plain.bias.grad, stored.bias.grad)


@pytest.mark.parametrize("storage", ["bf16", "fp8_scaled"])
def test_cpu_row_blocks_give_the_whole_weight_result(storage, monkeypatch):
    """A weight above ``_CPU_CHUNK_ELEMENTS`` is upcast and multiplied in row blocks (here 3 and a remainder) when
    the input is no larger than a block:
    the same output as the whole upcast weight (each output column is one matmul either way), the input gradient
    within fp32 rounding (its sum is split by blocks), the same bias gradient, and a buffer of one block."""
    from wantrainer.models.wan import stored_linear

    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(70, 24, generator=gen) * 0.05
    if storage == "bf16":
        layer = StoredLinear(24, 70, storage_dtype=torch.bfloat16)
        layer.weight.data = dense.to(torch.bfloat16)
    else:
        layer = FP8Linear(24, 70, scaled=True)
        layer.weight.data, layer.scale_weight = quantize_weight(dense, scaled=True)
    layer.bias.data = torch.randn(70, generator=gen)
    x = torch.randn(2, 9, 24, generator=gen)

    def run():
        layer.upcast_buffers = UpcastBuffers()
        xx = x.clone().requires_grad_(True)
        layer.bias.grad = None
        layer.bias.requires_grad_(True)
        out = layer(xx)
        out.sin().sum().backward()
        return out, xx.grad, layer.bias.grad.clone(), layer.upcast_buffers.nbytes()

    whole = run()
    monkeypatch.setattr(stored_linear, "_CPU_CHUNK_ELEMENTS", 20 * 24)
    assert stored_linear.cpu_row_chunks(layer.weight, 18) == [(0, 20), (20, 40), (40, 60), (60, 70)]
    assert stored_linear.cpu_row_chunks(layer.weight, 21) == [(0, 70)]  # the input larger than a block
    blocks = run()
    assert torch.equal(blocks[0], whole[0])
    assert rel_l2(blocks[1], whole[1]) < 1e-6
    assert torch.equal(blocks[2], whole[2])
    assert whole[3] == 70 * 24 * 4 and blocks[3] == 20 * 24 * 4


def test_fp8_matmul_path_matches_the_upcast_path_and_is_refused_off_cuda(fp32_file):
    """``torch._scaled_mm`` runs on the CPU in this torch, so its numbers are checked here; the option itself is
    refused where fp8 tensor cores are missing."""
    from wantrainer.core.wan_network_trainer import enable_fp8_matmul

    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(48, 32, generator=gen) * 0.05
    layer = FP8Linear(32, 48, scaled=True)
    weight, scale = quantize_weight(dense, scaled=True)
    layer.weight.data, layer.scale_weight = weight, scale
    layer.upcast_buffers = UpcastBuffers()
    x = torch.randn(4, 5, 32, generator=gen, requires_grad=True)
    upcast = layer(x)
    (grad_upcast,) = torch.autograd.grad(upcast.square().sum(), x)
    layer.fp8_matmul = True
    fast = layer(x)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), x)
    assert not torch.equal(fast, upcast) and rel_l2(fast, upcast) < 0.05  # activations quantised to e4m3
    assert rel_l2(grad_fast, grad_upcast) < 0.1  # the same backward formula, on the fp8 forward's output
    model = load_wan_dit(fp32_file, dtype=torch.float32, weight_dtype="fp8")
    with pytest.raises(UserError, match="fp8_matmul.*CUDA"):
        enable_fp8_matmul(model, torch.device("cpu"))
    assert model.enable_fp8_matmul() == 4 * 10  # q k v o of both attentions, ffn.0, ffn.2


_LOAD_PEAK = textwrap.dedent("""
    import sys, torch
    from wantrainer.models.wan.loading import load_wan_dit

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    load_wan_dit(sys.argv[3], dtype=torch.float32, weight_dtype=sys.argv[2])  # warm-up: code pages, allocator
    before = status("VmRSS:")
    model = load_wan_dit(sys.argv[1], dtype=torch.float32, weight_dtype=sys.argv[2])
    print(status("VmHWM:") - before, sum(t.nbytes for t in model.state_dict().values()))
""")


def test_bf16_storage_load_peak_is_about_half_of_fp32(tmp_path):
    """Peak RSS while loading a bf16 file (8 blocks, dim 512: 67 MB): kept in bf16 the load adds about the model's
    bytes; converted to fp32 it adds the fp32 copy, never the file's pages on top (they leave the process per
    tensor). Measured: bf16 0.54x of fp32."""
    config = WanModelConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, text_dim=64)
    with torch.device("meta"):
        shapes = WanModel(config).state_dict()
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "dit_bf16.safetensors"
    save_file({k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in shapes.items()}, path)
    file_bytes = path.stat().st_size
    small = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in WanModel(TINY4).state_dict().items()}, small)
    peaks = {}
    for mode in ("fp32", "bf16"):
        done = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(path), mode, str(small)], capture_output=True, text=True,
                              timeout=120, check=True)  # fmt: skip
        peak, model_bytes = (int(v) for v in done.stdout.split())
        peaks[mode] = (peak, model_bytes)
    (fp32_peak, fp32_bytes), (bf16_peak, bf16_bytes) = peaks["fp32"], peaks["bf16"]
    assert bf16_bytes < 0.55 * fp32_bytes
    # measured: fp32 144.6 MB peak for 144.0 MB of weights (the loader before this held the file's pages too:
    # 215.8 MB); bf16 78.2 MB for 76.9 MB
    assert fp32_peak < fp32_bytes + 0.2 * file_bytes, peaks  # no copy of the file's pages on top
    assert bf16_peak < 0.6 * fp32_peak, peaks


def config_problems(values):
    from wantrainer.config_parser import ConfigError, parse_config

    try:
        parse_config(values)
    except ConfigError as exc:
        return exc.problems
    return []


def test_old_keys_map_to_dit_weight_dtype():
    from wantrainer.config.model import ModelConfig

    assert ModelConfig().weight_dtype == "auto"
    assert ModelConfig(fp8_scaled=True).weight_dtype == "fp8_scaled"  # fp8_scaled alone is enough
    assert ModelConfig(fp8_base=True, fp8_scaled=True).weight_dtype == "fp8_scaled"
    assert ModelConfig(fp8_base=True).weight_dtype == "fp8"
    assert ModelConfig(dit_weight_dtype="bf16").weight_dtype == "bf16"
    assert config_problems({"fp8_scaled": True}) == []
    assert config_problems({"fp8_base": True, "dit_weight_dtype": "fp8"}) == []
    (conflict,) = config_problems({"fp8_base": True, "dit_weight_dtype": "bf16"})
    assert "`dit_weight_dtype`" in conflict and "`fp8_base`" in conflict
    (matmul,) = config_problems({"fp8_matmul": True})
    assert "`fp8_matmul`" in matmul and "dit_weight_dtype" in matmul
    (full,) = config_problems({"dit_weight_dtype": "bf16", "network_module": "full"})
    assert "`dit_weight_dtype`" in full and "full" in full


class LossRecorder(Handler):
    name = "loss_recorder"

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, trainer) -> None:
        self.losses.append(trainer.last_step.loss)


def test_training_with_bf16_storage_matches_fp32_copies(train_workspace, tmp_path):
    """The kit's DiT is a bf16 file: training with dit_weight_dtype = "bf16" (bf16 storage, fp32 compute) gives
    the same losses and LoRA as the fp32 copies of "auto", with half the block Linear bytes."""
    from train_support import load, lora_tensors
    from wantrainer.core.wan_network_trainer import build_trainer

    runs = {}
    for mode in ("auto", "bf16"):
        cfg = load(train_workspace.write(tmp_path / mode, max_train_steps=3, log_with="none",
                                         dit_weight_dtype=mode, gradient_checkpointing=True))
        recorder = LossRecorder()
        trainer = build_trainer(cfg, extra_handlers=[recorder])
        assert trainer.train() == "completed"
        losses = recorder.losses
        stored = [m for m in trainer.model.modules() if isinstance(m, StoredLinear)]
        runs[mode] = (losses, lora_tensors(tmp_path / mode / "out" / "lora.safetensors"), stored)
    assert runs["auto"][2] == [] and len(runs["bf16"][2]) == 2 * 10
    assert all(m.weight.dtype == torch.bfloat16 for m in runs["bf16"][2])
    assert runs["auto"][0] == runs["bf16"][0] and len(runs["auto"][0]) == 3
    assert all(torch.equal(runs["auto"][1][k], runs["bf16"][1][k]) for k in runs["auto"][1])
