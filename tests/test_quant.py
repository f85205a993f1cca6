"""glm_core.quant: weight-only int8 / int4 layers against the reference arithmetic and the official fixtures."""
import gc
import itertools
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from glm_core import native, quant
from glm_core.model import RMSNorm, linear
from conftest import FIXTURES, ROOT, needs_native_library
from quant_sweep import activation_bits, error_bound, quantized_activations

LAYER0 = "transformer.encoder.layers.0."
LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
needs_known_cpu_layout = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the int4 CPU layout is read back only where it is known (x86 AVX2 / AVX512)")


def official(bits: int):
    state = torch.load(FIXTURES / f"v2_int{bits}" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    golden = json.loads((FIXTURES / "golden" / f"v2_int{bits}_model.json").read_text())["quantized_layer0"]
    deq = np.load(FIXTURES / "golden" / f"v2_int{bits}_logits.npz")["dequant_layer0_query_key_value_weight"]
    return state, golden, torch.from_numpy(deq)


def official_qkv(bits: int):
    state, golden, deq = official(bits)
    name = LAYER0 + "self_attention.query_key_value."
    assert state[name + "weight"][0, :8].tolist() == golden["first_row_first_8_bytes"]
    module = quant.from_official(state[name + "weight"], state[name + "weight_scale"], bits, state[name + "bias"])
    return module.float(), deq, state[name + "bias"].float(), golden


def test_official_int8_layer0_is_the_official_cpu_arithmetic():
    module, deq, bias, golden = official_qkv(8)
    assert isinstance(module, quant.Int8Linear) and module.official
    assert torch.equal(module.dequantize(), deq)
    assert module.dequantize()[0, :16].tolist() == golden["first_row_first_16_dequant"]
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module(x), x.mm(deq.t()) + bias)  # official W8A16LinearCPU: inp.mm(weight.t()), then + bias
    eye = torch.eye(128)
    assert torch.equal(torch.ops.aten._weight_int8pack_mm(eye, module.qweight, module.scales).t(), deq)


def test_official_int4_layer0_dequantizes_bit_for_bit():
    module, deq, bias, golden = official_qkv(4)
    assert isinstance(module, quant.Int4Linear) and module.group_size == 128
    assert module.official   # the official arithmetic's inputs, fused kernels (see test_engine_glm's fast-path gate)
    assert torch.equal(module.dequantize(), deq)
    assert module.dequantize()[0, :16].tolist() == golden["first_row_first_16_dequant"]
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module(x), x.mm(deq.t()) + bias)
    # the fused kernel on an identity input returns the weights it multiplies by: exact in fp32, and in fp16 up to
    # rounding each weight to fp16 (bf16 is not exact: the fp16 scales lose bits in bf16)
    sz = module.scales_and_zeros
    eye = torch.eye(128)
    assert torch.equal(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, module.qweight, 128, sz).t(), deq)
    fp16 = torch.ops.aten._weight_int4pack_mm_for_cpu(eye.half(), module.qweight, 128, sz.half())
    assert torch.equal(fp16.t(), deq.half())


@pytest.mark.parametrize("bits", [8, 4])
def test_official_layers_of_every_shape_load(bits):
    state, _, _ = official(bits)
    for linear in LINEARS:
        name = LAYER0 + linear + "."
        qweight, scale = state[name + "weight"], state[name + "weight_scale"]
        module = quant.from_official(qweight, scale, bits, state.get(name + "bias")).float()
        q = qweight.to(torch.float32) if bits == 8 else quant.unpack_official_int4(qweight).float()
        assert torch.equal(module.dequantize(), scale.float()[:, None] * q)
        assert type(module) is (quant.Int8Linear if bits == 8 else quant.Int4Linear)


def test_unpack_official_int4_high_nibble_first_sign_extended():
    packed = torch.tensor([[0x7F - 256 + 256, -128, 0x19, -0x0F]], dtype=torch.int16).to(torch.int8)
    # 0x7F -> 7, -1 | 0x80 -> -8, 0 | 0x19 -> 1, -7 | 0xF1 -> -1, 1
    assert quant.unpack_official_int4(packed).tolist() == [[7, -1, -8, 0, 1, -7, -1, 1]]


def test_official_int4_without_a_kernel_shape_becomes_exact_int8():
    q = torch.randint(-7, 8, (16, 48), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = ((q[:, ::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
    scale = torch.rand(16).half()
    module = quant.from_official(packed, scale, 4, None)
    assert isinstance(module, quant.Int8Linear)  # in_features 48 is not a multiple of 32
    assert torch.equal(module.float().dequantize(), scale.float()[:, None] * q.float())


@pytest.fixture
def torch_products(monkeypatch):
    """Torch's fused kernels and the dense path only, as where GLM Studio's AVX2 and AMX products are not built (they
    have their own tests below): on torch's AVX2 path the AVX2 ones would take these products at every row count, on
    an AMX CPU the AMX ones from a few rows."""
    for takes in ("takes_int4", "takes_int8", "takes_int4_amx", "takes_int8_amx"):
        monkeypatch.setattr(native, takes, lambda x, module: False)


def test_int8_quantization_and_both_products(torch_products):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    module = quant.quantize_linear(w, b, "int8")
    scales = w.abs().amax(dim=1) / 127
    assert torch.equal(module.scales, scales)
    assert torch.equal(module.qweight, torch.round(w / scales[:, None]).to(torch.int8))
    deq = module.dequantize()
    assert (deq - w).abs().max() <= scales.max() / 2 + 1e-7
    x = torch.randn(5, 3, 96, generator=g)
    assert torch.equal(module(x), (x.reshape(-1, 96).mm(deq.t()) + b).reshape(5, 3, 48))
    bf16 = module.to(torch.bfloat16)
    for rows in (1, quant.dense_min_rows()):  # fused kernel (decode) and dequantize + GEMM (prefill)
        xb = torch.randn(rows, 96, generator=g).bfloat16()
        w = bf16.dequantize().double()
        ref = xb.double().mm(w.t())
        out = bf16(xb)
        assert out.dtype == torch.bfloat16
        # the product rounded to bf16, then the bf16 bias added and rounded again
        bound = error_bound(xb.double(), w, torch.bfloat16) + 2 ** -8 * (ref + bf16.bias.double()).abs()
        assert ((out.double() - ref - bf16.bias.double()).abs() <= bound).all()


def test_int4_quantization_and_both_products(torch_products):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(80, 256, generator=g)
    module = quant.quantize_linear(w.bfloat16(), None, "int4", group_size=64)
    assert isinstance(module, quant.Int4Linear) and module.group_size == 64
    groups = w.bfloat16().float().view(80, 4, 64)
    step = (groups.amax(2) - groups.amin(2)) / 15
    deq = module.dequantize()
    err = (deq.view(80, 4, 64) - groups).abs()
    assert (err <= step[..., None] * 0.51 + 1e-2).all()  # half a step, plus bf16 rounding of scale and zero
    # reference dequantization from the kernel's own parameters
    sz = module.scales_and_zeros.float()
    codes = module.unpack_codes(0, 80).float().view(80, 4, 64)
    assert torch.equal(deq, ((codes - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(80, 256))
    for rows in (1, 3, quant.dense_min_rows() + 1):
        x = torch.randn(rows, 256, generator=g).bfloat16()
        ref = x.double().mm(deq.double().t())
        assert ((module(x).double() - ref).abs() <= error_bound(x.double(), deq.double(), torch.bfloat16)).all()
    x = torch.randn(4, 256, generator=g)
    assert torch.equal(module.float()(x), x.mm(deq.contiguous().t()))  # W [out, in] as the official code holds it


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_bf16_activations_round_only_the_input(precision, torch_products):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    module = quant.quantize_linear(w, b, precision, 64, activation_dtype=torch.bfloat16)
    assert {module.bias.dtype, (module.scales if precision == "int8" else module.scales_and_zeros).dtype} == {
        torch.float32, torch.bfloat16}  # scales in the kernels' dtype, the bias as given
    for rows in (1, quant.dense_min_rows()):  # fused kernel (decode) and dequantize + fp32 GEMM (prefill)
        x = torch.randn(rows, 256, generator=g)
        out = module(x)
        assert out.dtype == torch.float32
        assert torch.equal(out, module(x.bfloat16().float()))
        xb, w = x.bfloat16().double(), module.dequantize().double()
        ref = xb.mm(w.t()) + b.double()
        # the product in bf16 (fused kernel, or a bf16 GEMM where bf16 is native), the bias added in fp32
        bound = error_bound(xb, w, torch.bfloat16) + 2 ** -24 * (ref.abs() + b.double().abs())
        assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_prefill_gemm_in_bf16_where_native_else_fp32(precision, monkeypatch, torch_products):
    """The dense path multiplies in bf16 where the CPU has native bf16, else in fp32, there through oneDNN or MKL
    (quant.matmul_fp32): both libraries give the product within fp32's rounding."""
    g = torch.Generator().manual_seed(7)
    module = quant.quantize_linear(torch.randn(96, 256, generator=g), None, precision, 64, activation_dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "DENSE_CHUNK_ELEMENTS", 32 * 256)   # three chunks of 32 rows
    x = torch.randn(quant.dense_min_rows(), 256, generator=g)
    ref = x.bfloat16().float().mm(module.dequantize().t())
    xb, w = x.bfloat16().double(), module.dequantize().double()
    # AVX2 (fp32 GEMM on oneDNN, as on AMD CPUs, or MKL), or a CPU with native bf16 (bf16 GEMM, bf16 output)
    for slow, onednn in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(quant, "slow_half_gemm", lambda dtype: slow)
        monkeypatch.setattr(quant, "onednn_for_fp32_linears", lambda: onednn)
        out = module(x)
        assert out.dtype == torch.float32
        bound = error_bound(xb, w, torch.float32 if slow else torch.bfloat16)
        assert ((out.double() - xb.mm(w.t())).abs() <= bound).all()
        if slow:   # fp32 all through: within fp32 rounding, far below bf16's
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_chunked_prefill_product_leaves_nothing_of_the_last_chunk_in_its_scratch(precision, monkeypatch,
                                                                                     torch_products):
    """The dense path dequantizes chunk after chunk into one buffer: each chunk is the weight's own rows, whatever
    the buffer held, and the product of all chunks is the product of the whole weight."""
    g = torch.Generator().manual_seed(11)
    module = quant.quantize_linear(torch.randn(208, 256, generator=g), None, precision, 64, activation_dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "DENSE_CHUNK_ELEMENTS", 64 * 256)   # 64-row chunks: 3 whole ones and a 16-row tail
    whole = module.dequantize(torch.bfloat16)
    scratch = quant.Scratch(torch.full((64 * 256,), float("nan"), dtype=torch.bfloat16),
                            torch.full((64 * 256,), 255, dtype=torch.uint8))
    for start in (0, 64, 128, 192, 0):
        stop = min(start + 64, 208)
        assert torch.equal(module.dequantize(torch.bfloat16, start, stop, scratch), whole[start:stop])
    x = torch.randn(quant.dense_min_rows(), 256, generator=g)
    xb, w = x.bfloat16().double(), whole.double()
    out = module(x)
    assert ((out.double() - xb.mm(w.t())).abs() <= error_bound(xb, w, torch.bfloat16)).all()


@needs_native_library
@pytest.mark.parametrize("group", quant.INT4_GROUP_SIZES)
def test_native_int4_dequantization_rounds_as_torchs(group):
    """The dense path's one-pass dequantization (int4_dequantize_bf16, on every AVX2 CPU whatever torch's path) gives
    (code - 8) * scale + zero rounded once to fp32 and once to bf16, bit for bit what the elementwise one in fp32
    rounded to bf16 gives: every code, scales and zeros from 1e-6 to 1e4, any whole blocks of the layer's layout
    (AVX-512's 64 rows, AVX2's 32); the tail block (pairs of rows) stays with torch."""
    g = torch.Generator().manual_seed(group)
    rows = 4 * 64 + 16
    w = torch.randn(rows, 3 * group, generator=g) * torch.logspace(-6, 4, rows)[:, None] + torch.randn(rows, 1) / 8
    module = quant.quantize_linear(w, None, "int4", group, torch.bfloat16)
    full = rows // module.block_rows * module.block_rows
    assert module.half_split == (torch.backends.cpu.get_cpu_capability() != "DEFAULT")
    if not module.half_split:
        pytest.skip("torch's default path pairs rows in every block: its dequantization stays torch's")
    assert native.dequantizes_int4(module, torch.bfloat16, full) and not native.dequantizes_int4(module, torch.bfloat16, rows)
    reference = module.dequantize(torch.float32).to(torch.bfloat16)
    assert set(module.unpack_codes(0, full).unique().tolist()) == set(range(16))
    for start, stop in [(0, full), (module.block_rows, 2 * module.block_rows), (0, rows)]:
        got = module.dequantize(torch.bfloat16, start, stop)
        assert torch.equal(got.view(torch.int16), reference[start:stop].view(torch.int16)), (start, stop)


@needs_native_library
@pytest.mark.parametrize("in_features", [8, 100, 4096])   # 100: past the kernel's 8-wide steps; padded to 112
def test_native_int8_dequantization_rounds_as_torchs(in_features):
    """int8_dequantize_bf16: q * scale rounded once to bf16, bit for bit what the fp32 dequantization rounded to bf16
    gives, for scales from 1e-6 to 1e4, any rows, with the weight's zero padding left out."""
    g = torch.Generator().manual_seed(in_features)
    w = torch.randn(40, in_features, generator=g) * torch.logspace(-6, 4, 40)[:, None]
    module = quant.quantize_linear(w, None, "int8", activation_dtype=torch.bfloat16)
    assert native.dequantizes_int8(module, torch.bfloat16)
    reference = module.dequantize(torch.float32).to(torch.bfloat16)
    for start, stop in [(0, 40), (3, 17)]:
        got = module.dequantize(torch.bfloat16, start, stop)
        assert got.shape == (stop - start, in_features)
        assert torch.equal(got.view(torch.int16), reference[start:stop].view(torch.int16)), (start, stop)


def test_official_layers_keep_the_fused_kernels_below_dense_min_rows(monkeypatch):
    """Where dense_min_rows() is lower (AMX), layers GLM Studio quantizes take the dense path from there, or the AMX
    product (the dense path's weights) from its few rows; official checkpoints' layers keep the fused kernels up to
    DENSE_MIN_ROWS: bf16 weights cost the v2_int4 fixture its 99 % argmax agreement with the official code
    (test_engine_glm's fast-path gate)."""
    monkeypatch.setattr(quant, "dense_min_rows", lambda: 4)
    monkeypatch.setattr(native, "takes_int8", lambda x, module: False)   # GLM Studio's AVX2 products
    taken = []

    def spy(kind):
        return lambda a, b: taken.append((kind, a if kind == "amx" else b)) or torch.zeros(
            (b if kind == "amx" else a).shape[0], 64, dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "_dense_matmul", spy("dense"))
    monkeypatch.setattr(quant.Int8Linear, "amx_product", spy("amx"))
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (64, 128), generator=g, dtype=torch.int8)
    official = quant.from_official(q, torch.rand(64, generator=g).bfloat16(), 8, None, torch.bfloat16)
    ours = quant.quantize_linear(torch.randn(64, 128, generator=g), None, "int8", activation_dtype=torch.bfloat16)
    for amx in (False, True):
        monkeypatch.setattr(native, "takes_int8_amx", lambda x, module: amx)
        kind = "amx" if amx else "dense"
        taken.clear()
        official(torch.randn(8, 128, generator=g))
        assert taken == []
        ours(torch.randn(8, 128, generator=g))
        assert taken == [(kind, ours)]
        official(torch.randn(quant.DENSE_MIN_ROWS, 128, generator=g))
        assert taken == [(kind, ours), (kind, official)]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantizing_in_row_slices_changes_nothing(precision, monkeypatch):
    w = torch.randn(320, 128, generator=torch.Generator().manual_seed(6)).half()
    whole = quant.quantize_linear(w, None, precision, 32, activation_dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "QUANTIZE_ROWS", 64)   # five slices, and five int4 packing calls
    sliced = quant.quantize_linear(w, None, precision, 32, activation_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), sliced.state_dict().values()))


def test_int4_is_better_than_per_channel_and_group_size_helps():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    errors = [(quant.quantize_linear(w, None, "int4", g).dequantize() - w).norm() / w.norm() for g in (256, 128, 32)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.12  # asymmetric 16 levels per 128 columns; per-channel symmetric [-7, 7] is about 0.2 here


@needs_known_cpu_layout
@pytest.mark.parametrize("out_features", [16, 48, 80, 144, 1024 + 48])
def test_int4_cpu_layout_reads_back(out_features):
    codes = torch.randint(0, 16, (out_features, 64), generator=torch.Generator().manual_seed(out_features))
    sz = torch.zeros(1, out_features, 2)
    module = quant.Int4Linear(codes, sz, 64, None)
    assert module.unpackable
    assert torch.equal(module.unpack_codes(0, out_features), codes.to(torch.uint8))
    if out_features > 1024:
        assert torch.equal(module.unpack_codes(1024, out_features), codes[1024:].to(torch.uint8))


def test_int4_group_size_fallbacks():
    assert quant.int4_group_size(4096, 4608, 128) == 128
    assert quant.int4_group_size(13696, 4096, 256) == 128  # 13696 = 107 * 128
    assert quant.int4_group_size(96, 64, 128) == 32
    assert quant.int4_group_size(48, 64, 128) is None
    assert quant.int4_group_size(128, 24, 128) is None  # the CPU kernel packs 16 rows at a time
    assert quant.quantize_linear(torch.randn(64, 96), None, "int4").group_size == 32
    assert isinstance(quant.quantize_linear(torch.randn(64, 48), None, "int4"), quant.Int8Linear)
    assert isinstance(quant.quantize_linear(torch.randn(24, 128), None, "int4"), quant.Int8Linear)
    with pytest.raises(ValueError, match="group size"):
        quant.quantize_linear(torch.randn(64, 128), None, "int4", group_size=100)
    with pytest.raises(ValueError, match="precision"):
        quant.quantize_linear(torch.randn(64, 128), None, "int3")


@pytest.mark.parametrize("precision, ratio", [("int8", 0.51), ("int4", 0.28)])
def test_modules_hold_no_float_copy_of_the_weight(precision, ratio):
    weight = torch.randn(256, 512).bfloat16()
    alive = weakref.ref(weight)
    module = quant.quantize_linear(weight, None, precision)
    del weight
    gc.collect()
    assert alive() is None
    state = module.state_dict()
    assert not any(t.is_floating_point() and t.numel() >= 256 * 512 // 16 for t in state.values())
    assert sum(t.nbytes for t in state.values()) < ratio * 256 * 512 * 2  # against the bf16 weight


needs_native = pytest.mark.skipif(
    not native.runs_products() or not native.compiler_path(),
    reason="the AVX2 products run on torch's AVX2 path only (an AVX-512 machine runs this module there: "
           "test_avx2_path), built by a C compiler")


# decode kernels, the tiled products (remainders of their 6-row micro-kernels, int4's 4-row ones), more rows than the
# tiled products take at a time (TILED_ROW_CHUNK = 252 in the C file)
NATIVE_ROWS = [1, 2, 3, native.INT4_TILED_MIN_ROWS, native.INT8_TILED_MIN_ROWS + 1, native.BF16_TILED_MIN_ROWS + 1, 300]


def int4_reference(module: quant.Int4Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ W.T in float64 (x quantized per block of 32 where the layer's product does that: activation_bits), and the
    bound on the fp32 rounding. The AVX2 decode kernel sums code * x per group, then scales and adds
    (zero - 8 scale) * sum(x); the fp32 tiles hold w = code * scale + (zero - 8 scale) and sum w * x; with integer
    activations each block's exact integer sum is added times (activation scale x weight scale), then
    (zero - 8 scale) * sum(x). Each way the rounding is bounded by those terms' magnitudes, not W's:
    (K + 2 K / group + 4) * 2^-24 * sum |x| (|code * scale| + |zero - 8 scale|), every sum in fp32."""
    out_features, in_features, group = module.out_features, module.in_features, module.group_size
    bits = activation_bits(module, x)
    x64 = quantized_activations(x, bits) if bits else x.double()
    codes = module.unpack_codes(0, out_features).double()
    scales, zeros = (module.scales_and_zeros[..., i].double().t().repeat_interleave(group, dim=1) for i in (0, 1))
    ref = x64 @ ((codes - 8) * scales + zeros).t()
    magnitude = x64.abs() @ ((codes * scales).abs() + (zeros - 8 * scales).abs()).t()
    return ref, 1.01 * (in_features + 2 * in_features // group + 4) * 2.0 ** -24 * magnitude


@needs_native
@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("rows", NATIVE_ROWS + [10])
@pytest.mark.parametrize("out_features, in_features, group", [(32, 64, 32), (96, 384, 128), (224, 512, 256),
                                                              (64, 4096, 128), (32, 12288, 128)])   # shorter chunks
def test_native_int4_product_is_the_dequantized_product_in_fp32(out_features, in_features, group, rows,
                                                                 int8_activations):
    """The AVX2 int4 products against x @ W.T in float64: the decode kernel, the fp32 tiles (official checkpoints'
    layers) and the product of int8 activations (quantize_linear's layers, from 2 rows)."""
    g = torch.Generator().manual_seed(out_features + rows)
    module = quant.quantize_linear(torch.randn(out_features, in_features, generator=g) / 16, None, "int4", group,
                                   torch.bfloat16)
    assert module.group_size == group and not module.official
    module.official = not int8_activations
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    assert native.takes_int4(x, module)
    y = native.int4_matmul(x, module.qweight, module.scales_and_zeros, out_features, group, int8_activations).double()
    assert torch.equal(module.fused(x), y.float())
    assert torch.equal(module(x), y.bfloat16())   # the layer's product is this one, prompt-sized rows included
    ref, bound = int4_reference(module, x)
    assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() - bound).max())


@needs_native
def test_native_int4_rows_are_the_same_alone_or_in_a_batch():
    """Every row of the int4 product of int8 activations goes through the same operations: a visitor's reply does not
    depend on who else is decoding. (A row alone takes the decode kernel: bf16 activations, not int8.)"""
    g = torch.Generator().manual_seed(7)
    module = quant.quantize_linear(torch.randn(96, 512, generator=g) / 16, None, "int4", 128, torch.bfloat16)
    x = torch.randn(11, 512, generator=g).bfloat16()
    together = module.fused(x)
    for i in range(len(x)):
        for batch, at in ((x[[i, (i + 1) % 11]], 0), (x[[(i + 5) % 11, i, (i + 2) % 11]], 1),
                          (x[torch.arange(i - 4, i + 2) % 11], 4)):
            assert torch.equal(module.fused(batch)[at], together[i]), (i, len(batch))


def all_fifteens(out_features: int, rows: int, sign: int) -> tuple[quant.Int4Linear, torch.Tensor, torch.Tensor]:
    """An int4 layer of codes 15 (scale 1/16, zero 1/4: w = 11/16), rows of activations +-0.5 (each block quantizes to
    +-127), and the exact product."""
    in_features, group = 256, 128
    codes = torch.full((out_features, in_features), 15, dtype=torch.uint8)
    scales_and_zeros = torch.stack([torch.full((in_features // group, out_features), 2.0 ** -4),
                                    torch.full((in_features // group, out_features), 0.25)], -1).bfloat16()
    module = quant.Int4Linear(codes, scales_and_zeros, group, None, torch.bfloat16)
    x = torch.full((rows, in_features), 0.5 * sign).bfloat16()
    product = sign * 0.5 * in_features * (15 / 16 + 0.25 - 8 / 16)
    expected = torch.full((rows, out_features), product, dtype=torch.float64)
    return module, x, expected


@needs_native
@pytest.mark.parametrize("sign", [1, -1])
def test_native_int4_extreme_codes_and_activations_do_not_saturate(sign):
    """Codes of 15 against activations that all quantize to +-127: a block's 16-bit sums reach 16 x 15 x 127 =
    30480, just inside int16, and the product is still exact up to fp32 rounding."""
    module, x, expected = all_fifteens(32, rows=4, sign=sign)
    y = module.fused(x).double()
    ref, bound = int4_reference(module, x)
    assert ((y - ref).abs() <= bound).all()
    torch.testing.assert_close(y, expected)


@needs_native
@pytest.mark.parametrize("rows", NATIVE_ROWS)
@pytest.mark.parametrize("out_features, in_features", [(4, 16), (36, 48), (200, 4112)])
def test_native_bf16_product_is_exact_products_summed_in_fp32(out_features, in_features, rows):
    g = torch.Generator().manual_seed(out_features + rows)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    assert native.takes_bf16(x, w)
    y = native.bf16_matmul(x, w).double()
    ref = x.double() @ w.double().t()
    assert ((y - ref).abs() <= error_bound(x.double(), w.double(), torch.float32)).all()
    layer = nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    layer.weight.data, layer.bias.data = w, torch.randn(out_features, generator=g).bfloat16()
    assert torch.equal(linear(layer, x), (y.float() + layer.bias).bfloat16())   # the model's product is this one


needs_avx512_bf16 = pytest.mark.skipif(
    not native.avx512_bf16() or not native.compiler_path(),
    reason="the bf16 decode product runs on CPUs with AVX-512 bf16 (Zen 4, Xeons from Cooper Lake on), torch on its "
           "AVX-512 path, built by a C compiler")


@needs_avx512_bf16
@pytest.mark.parametrize("out_features, in_features", [(8, 32), (64, 96), (264, 4128), (288, 4128)])
def test_bf16_decode_and_short_prompt_rows_are_exact_products_summed_in_fp32_more_rows_go_to_torch(out_features,
                                                                                              in_features):
    """On AVX-512 bf16 a bf16 linear's weight stays plain (not packed for oneDNN) where bf16_decode takes it: up to
    BF16_DECODE_MAX_ROWS rows multiply there (a row the same alone or in a batch), and with AMX up to
    AMX_MAX_ROWS_BF16 rows in the AMX product (out a multiple of 32), each within fp32 accumulation's error of the exact
    product, through glm_core.model.linear and the module alike; more rows are torch's product."""
    g = torch.Generator().manual_seed(out_features)
    amx = native.amx_library() is not None and out_features % 32 == 0
    most = native.AMX_MAX_ROWS_BF16 if amx else native.BF16_DECODE_MAX_ROWS
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    layer = nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    layer.weight.data, layer.bias.data = w, torch.randn(out_features, generator=g).bfloat16()
    assert quant.route_linears(layer) == 1 and type(layer) is quant.NativeBf16Linear
    assert layer.weight.data_ptr() == w.data_ptr()
    with torch.no_grad():
        for rows in [*range(1, native.BF16_DECODE_MAX_ROWS + 2), 17, native.AMX_MAX_ROWS_BF16, most + 1]:
            x = torch.randn(rows, in_features, generator=g).bfloat16()
            if rows > most:
                assert not native.takes_bf16(x, w)
                assert torch.equal(layer(x), nn.functional.linear(x, w, layer.bias))
                continue
            assert native.takes_bf16(x, w)
            y = native.bf16_matmul(x, w).double()
            ref = x.double() @ w.double().t()
            assert ((y - ref).abs() <= error_bound(x.double(), w.double(), torch.float32)).all()
            if rows <= native.BF16_DECODE_MAX_ROWS:
                torch.testing.assert_close(y[:1], native.bf16_matmul(x[:1], w).double(), rtol=0, atol=0)
            want = (y.float() + layer.bias).bfloat16()
            assert torch.equal(linear(layer, x), want) and torch.equal(layer(x.unsqueeze(1)), want.unsqueeze(1))
    odd = nn.Linear(in_features, out_features + 4, dtype=torch.bfloat16)   # out not a multiple of 8: packed
    assert quant.route_linears(odd) == 1 and type(odd) is quant.OneDnnLinear


@needs_native
@pytest.mark.parametrize("rows", [1, native.INT8_TILED_MIN_ROWS, 300])
@pytest.mark.parametrize("out_features, in_features", [(4, 16), (36, 100), (200, 4104)])
def test_native_int8_product_is_exact_products_summed_in_fp32(out_features, in_features, rows):
    """One row (the lone visitor's decode step), and the tiled product from INT8_TILED_MIN_ROWS on (torch's kernel in
    between). Widths not a multiple of 16 run on the layer's zero-padded weight: the decode kernel's tail, the tiled
    product's last tile."""
    g = torch.Generator().manual_seed(out_features + rows)
    module = quant.quantize_linear(torch.randn(out_features, in_features, generator=g) / 16, None, "int8",
                                   activation_dtype=torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    assert native.takes_int8(x, module) and not native.takes_int8(x[:1].repeat(2, 1), module)
    y = native.int8_matmul(x, module.qweight, module.scales).double()
    assert torch.equal(module.fused(x), y.float())
    assert torch.equal(module(x), y.bfloat16())   # the layer's product is this one, prompt-sized rows included
    w = module.dequantize(torch.float64)
    ref = x.double() @ w.t()
    assert ((y - ref).abs() <= error_bound(x.double(), w, torch.float32)).all()


needs_amx = pytest.mark.skipif(
    not native.amx_wanted() or not native.compiler_path(),
    reason="the AMX products run on CPUs with AMX (Xeons from Sapphire Rapids on), torch on its AVX-512 path, built by "
           "a C compiler")
# below and at the dense path's crossover, tiles of 16 rows with and without a tail, the most rows they take
AMX_ROWS = [native.AMX_MIN_ROWS_INT8, 16, 17, native.AMX_MIN_ROWS_INT4, 33, 100, native.AMX_MAX_ROWS]


@needs_amx
@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("rows", AMX_ROWS)
@pytest.mark.parametrize("out_features, in_features, group", [
    (64, 64, 32), (128, 352, 32),   # fewer inner indices than a chunk (256), a chunk and a tail
    (192, 4096, 128),               # x's rows 8 KB apart: the layout the tiles are copied out of
    (64, 2720, 32)])                # 13696 = 4096 x 3.34's shape class: a tail chunk of 160, groups across chunks
def test_amx_product_is_the_dense_paths_weights_summed_in_fp32(precision, rows, out_features, in_features, group):
    """The AMX products multiply the weights the dense path dequantizes (bf16, the same values) with fp32 sums: against
    x @ W.T in float64, within fp32's rounding of K products. The layer takes them from their first row count."""
    assert native.amx_library() is not None
    g = torch.Generator().manual_seed(out_features + rows)
    module = quant.quantize_linear(torch.randn(out_features, in_features, generator=g) / 16, None, precision, group,
                                   torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    first = native.AMX_MIN_ROWS_INT4 if precision == "int4" else native.AMX_MIN_ROWS_INT8
    assert module.amx_takes(x) == (rows >= first)
    if rows < first:
        return
    y = module.amx_product(x).double()
    assert torch.equal(module(x), y.bfloat16())   # the layer's product is this one
    w = module.dequantize(torch.bfloat16).double()
    ref = x.double() @ w.t()
    assert ((y - ref).abs() <= error_bound(x.double(), w, torch.float32)).all()


@needs_amx
@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("rows", list(range(1, 9)) + [13, native.AMX_MIN_ROWS_INT4 - 1, 51,
                                                      native.AMX_MIN_ROWS_INT4_OFFICIAL - 1])
@pytest.mark.parametrize("out_features, in_features, group", [(64, 64, 32), (128, 4096, 128), (192, 2720, 32),
                                                              (64, 576, 64), (128, 512, 256)])
def test_int4_decode_is_the_dequantized_product_in_fp32(out_features, in_features, group, rows, official):
    """The AVX-512 decode kernels (AMX CPUs, fewer rows than the AMX product takes, all of an official layer's fused
    rows), against x @ W.T in float64 with x quantized per block of 32 (int16 in official checkpoints' layers, int8
    in the others), exact integer sums per block, then fp32; rows in passes of 4: every remainder."""
    assert native.amx_library() is not None
    g = torch.Generator().manual_seed(out_features + rows)
    module = quant.quantize_linear(torch.randn(out_features, in_features, generator=g) / 16, None, "int4", group,
                                   torch.bfloat16)
    assert module.group_size == group
    module.official = official
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    if not official and rows >= native.AMX_MIN_ROWS_INT4:   # the AMX product runs those
        assert not native.takes_int4_decode(x, module) and module.amx_takes(x)
        return
    assert native.takes_int4_decode(x, module) and not module.amx_takes(x)
    assert activation_bits(module, x) == (16 if official else 8)
    y = native.int4_decode(x, module).double()
    assert torch.equal(module(x), y.bfloat16())   # the layer's product is this one
    ref, bound = int4_reference(module, x)
    assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() - bound).max())


@needs_amx
def test_int16_activations_keep_bf16_values_within_2_to_the_7_of_their_blocks_largest():
    """Official checkpoints' decode rounds x to int16 on a power-of-two scale: bf16 values at most 2^7 below their
    block's largest come out exact, smaller ones within 2^-15 of it."""
    x = torch.zeros(1, 64)
    x[0, :32] = torch.tensor([3.0, -2.0 ** -4 * 1.0078125] + [2.0 ** -(e % 12) * (-1) ** e for e in range(30)])
    x[0, 32:] = torch.linspace(-1e-3, 1e-3, 32) * (1 + 2.0 ** -7)
    x = x.bfloat16()
    q = quantized_activations(x, 16)
    top = x.float().unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True).expand(-1, -1, 32).flatten(-2)
    near = x.float().abs() >= top / 2 ** 7
    assert torch.equal(q[near], x.double()[near])
    assert ((q - x.double()).abs() <= top.double() * 2.0 ** -15).all()
    module = quant.quantize_linear(torch.randn(64, 64) / 16, None, "int4", 32, torch.bfloat16)
    module.official = True
    ref, bound = int4_reference(module, x)
    assert ((native.int4_decode(x, module).double() - ref).abs() <= bound).all()


@needs_amx
@pytest.mark.parametrize("official", [False, True])
def test_int4_decode_rows_are_the_same_alone_or_in_a_batch(official):
    """Every row of the decode kernels goes through the same operations: a visitor's decode step does not depend on
    who else is decoding, up to the rows the AMX product takes over from."""
    g = torch.Generator().manual_seed(7)
    module = quant.quantize_linear(torch.randn(128, 512, generator=g) / 16, None, "int4", 128, torch.bfloat16)
    module.official = official
    x = torch.randn(native.AMX_MIN_ROWS_INT4 - 1, 512, generator=g).bfloat16()
    together = module(x)
    for i in range(len(x)):
        for batch, at in ((x[[i]], 0), (x[[(i + 1) % len(x), i]], 1), (x[torch.arange(i - 4, i + 3) % len(x)], 4)):
            assert torch.equal(module(batch)[at], together[i]), (i, len(batch))


@needs_amx
def test_int16_decode_is_exact_where_every_step_is():
    """Activations of 8 significant bits within 2^7 of their block's largest, power-of-two scales: the int16 rounding
    keeps x as it is and every sum stays within fp32's 24 bits, so the official layers' decode product is exactly
    x @ W.T (a scale other than a power of two, or a lost bit, would show)."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (64, 256), generator=g, dtype=torch.uint8)
    scales_and_zeros = torch.stack([torch.full((2, 64), 2.0 ** -4), torch.zeros(2, 64)], -1).bfloat16()
    module = quant.Int4Linear(codes, scales_and_zeros, 128, None, torch.bfloat16, official=True)
    x = (torch.randint(1, 128, (3, 256), generator=g) * (1 - 2 * torch.randint(0, 2, (3, 256), generator=g)))
    x = (x / 64.0).bfloat16()
    assert torch.equal(quantized_activations(x, 16), x.double())
    exact = x.double() @ ((codes.double() - 8) / 16).t()
    assert torch.equal(native.int4_decode(x, module).double(), exact)


@needs_amx
@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("sign", [1, -1])
def test_int4_decode_extreme_codes_and_activations_are_exact(sign, official):
    """Codes of 15 (both nibbles, the high one multiplied as 16 x 15) against activations that all quantize to
    +-127 (int8) or +-2^14 (int16): exact integer sums, then the scales."""
    module, x, expected = all_fifteens(64, rows=3, sign=sign)
    module.official = official
    assert native.takes_int4_decode(x, module)
    torch.testing.assert_close(native.int4_decode(x, module).double(), expected, rtol=2.0 ** -20, atol=0)


@needs_amx
def test_without_a_c_compiler_the_amx_products_stay_off_and_the_log_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GLM_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    module = quant.quantize_linear(torch.randn(64, 128) / 16, None, "int4", 32, torch.bfloat16)
    x = torch.randn(native.AMX_MIN_ROWS_INT4, 128).bfloat16()
    native.amx_library.cache_clear()
    try:
        assert native.amx_library() is None
        assert not native.takes_int4_decode(x[:1], module) and not module.amx_takes(x)
        for rows in (1, len(x)):   # torch's kernel (decode), the dense path
            w = module.dequantize(torch.bfloat16).double()
            ref = x[:rows].double() @ w.t()
            assert ((module(x[:rows]).double() - ref).abs() <= error_bound(x[:rows].double(), w, torch.bfloat16)).all()
        assert "AMX products unavailable, torch's kernels run instead" in caplog.text and "no-such-cc" in caplog.text
    finally:
        native.amx_library.cache_clear()   # the next use builds with the real compiler again


@needs_amx
def test_amx_products_leave_what_they_cannot_take_to_the_other_paths():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 96, generator=g).bfloat16()
    int4 = quant.quantize_linear(torch.randn(96, 96, generator=g), None, "int4", 32, torch.bfloat16)   # 1.5 blocks
    int8 = quant.quantize_linear(torch.randn(48, 96, generator=g), None, "int8", activation_dtype=torch.bfloat16)
    exact = quant.quantize_linear(torch.randn(64, 96, generator=g), None, "int8")   # fp32 input: the official arithmetic
    more = torch.randn(native.AMX_MAX_ROWS + 1, 96, generator=g).bfloat16()
    takes_int8 = quant.quantize_linear(torch.randn(64, 96, generator=g), None, "int8", activation_dtype=torch.bfloat16)
    assert not int4.amx_takes(x) and not int8.amx_takes(x) and not exact.amx_takes(x.float())
    assert takes_int8.amx_takes(x) and not takes_int8.amx_takes(more)
    for module in (int4, int8):
        w = module.dequantize(torch.bfloat16).double()
        assert ((module(x).double() - x.double() @ w.t()).abs() <= error_bound(x.double(), w, torch.bfloat16)).all()


@needs_native
def test_without_a_c_compiler_torchs_kernels_run_and_the_log_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GLM_STUDIO_CACHE", str(tmp_path))
    module = quant.quantize_linear(torch.randn(64, 128) / 16, None, "int4", 32, torch.bfloat16)
    x = torch.randn(1, 128).bfloat16()
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, module.qweight, 32, module.scales_and_zeros)
    for compiler, said in [(str(tmp_path / "no-such-cc"), "no-such-cc"), ("false", "false failed")]:
        monkeypatch.setenv("CC", compiler)
        native.library.cache_clear()
        try:
            with pytest.raises(RuntimeError, match=said):
                native.build(tmp_path / "native")
            assert native.library() is None and not native.takes_int4(x, module)
            assert torch.equal(module.fused(x), expected)
            assert "torch's kernels run instead" in caplog.text and said in caplog.text
        finally:
            native.library.cache_clear()   # the next use builds with the real compiler again
    assert not list((tmp_path / "native").glob("*.so"))


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mapped libraries")
def test_native_kernels_share_torchs_openmp_runtime():
    """A second OpenMP runtime would keep its own spinning threads beside torch's: the oversubscription that made decode
    collapse on a busy machine (threads.py). Built with -fopenmp, the library must bind to the libgomp torch loaded.
    In a fresh process: others (sentencepiece) bring their own runtime into this one."""
    code = ("import torch\nfrom glm_core import native\nassert native.library() is not None\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l.split()[-1].rpartition('/')[2]}))")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == 0, child.stderr[-2000:]
    runtimes = json.loads(child.stdout.replace("'", '"'))
    assert len(runtimes) == 1 and "torch" in runtimes[0], runtimes


def test_native_kernels_stay_off_when_turned_off(monkeypatch):
    monkeypatch.setenv("GLM_STUDIO_NATIVE_KERNELS", "0")
    assert not native.wanted()


def test_bias_is_settable_and_outputs_follow_the_input_dtype():
    module = quant.quantize_linear(torch.randn(32, 64), torch.ones(32), "int4", 32).to(torch.bfloat16)
    x = torch.randn(2, 64).bfloat16()
    with_bias = module(x)
    module.bias = None
    torch.testing.assert_close(with_bias, module(x) + 1)
    module.bias = nn.Parameter(torch.full((32,), 2.0).bfloat16(), requires_grad=False)
    torch.testing.assert_close(module(x), with_bias + 1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert module.to(dtype)(x.to(dtype)).dtype == dtype
    with pytest.raises(RuntimeError, match="packed for cpu"):
        module(torch.empty(1, 64, device="meta"))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
                                      for _ in range(2)])
        self.proj_out = nn.Linear(64, 64)
        self.shared = nn.Linear(64, 64)
        self.again = self.shared
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.blocks(h)
        return self.lm_head(self.proj_out(self.again(self.shared(h))))


@pytest.mark.parametrize("precision, tolerance", [("int8", 0.02), ("int4", 0.15)])
def test_quantize_model_replaces_in_place(precision, tolerance):
    torch.manual_seed(5)
    model = TinyLM().eval()
    ids = torch.arange(50)
    with torch.no_grad():
        before = model(ids)
        assert quant.quantize_model(model, precision, group_size=32, skip=lambda n: n == "proj_out") is model
        after = model(ids)
    kind = quant.Int8Linear if precision == "int8" else quant.Int4Linear
    assert all(isinstance(model.blocks[i][j], kind) for i in range(2) for j in (0, 2))
    assert isinstance(model.shared, kind) and model.again is model.shared
    assert type(model.proj_out) is nn.Linear
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert ((after - before).norm() / before.norm()) < tolerance


def gguf_weight(kind: str, rows: int, columns: int, seed: int) -> torch.Tensor:
    """A float weight as a GGUF Q8_0, Q4_1 or Q4_0 tensor holds it: quantized by gguf-py (llama.cpp's quantizers),
    dequantized as transformers does on load."""
    from gguf import GGMLQuantizationType, quants
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).numpy()
    w[1, :32] = 0   # a block of zeros: scale 0
    w[-1, 32:64] = 0.5   # a block of one value: Q4_1's scale 0, its min that value
    kind = getattr(GGMLQuantizationType, kind.upper())
    return torch.from_numpy(quants.dequantize(quants.quantize(w, kind), kind).copy())


TABLES = {"q8_0": quant.q8_0_tables, "q4_1": quant.q4_1_tables}


@pytest.mark.parametrize("kind", TABLES)
def test_gguf_tables_give_a_gguf_tensor_back_exactly_and_nothing_else(kind, monkeypatch):
    w = gguf_weight(kind, 40, 96, seed=1)
    codes, scales = TABLES[kind](w)
    module = quant.GGUFLinear(kind, codes, scales)
    assert (module.out_features, module.in_features) == (40, 96)
    assert torch.equal(module.dequantize(), w)
    monkeypatch.setattr(native, "dequantizes_gguf", lambda module: False)   # torch's reading of the codes
    assert torch.equal(module.dequantize(), w)
    if kind == "q8_0":
        assert codes.dtype == torch.int8 and scales.shape == (40, 3) and codes.abs().max() == 127
        ids = torch.tensor([[3, 1], [39, 0]])
        assert torch.equal(quant.Int8Embedding(codes, scales)(ids), w[ids])
    else:
        assert codes.shape == (40, 3, 16) and scales.shape == (40, 3, 2)
    other = TABLES["q4_1" if kind == "q8_0" else "q8_0"]
    assert other(w) is None                                       # the other kind's grid
    nudged = w.clone()
    nudged[7, 50] = torch.nextafter(nudged[7, 50], torch.tensor(1e9))   # one weight off the block's grid
    assert TABLES[kind](nudged) is None
    assert TABLES[kind](torch.randn(40, 96)) is None              # plain floats
    assert TABLES[kind](w[:, :80]) is None                        # not whole blocks
    assert TABLES[kind](w.bfloat16()) is None                     # not the fp32 weights
    assert TABLES[kind](w / 3) is None                            # off the grid


def test_q4_0_tensors_are_kept_as_q4_1_tables_exactly():
    """A GGUF Q4_0 tensor ((code - 8) x fp16 scale) is the Q4_1 tables' code x scale + min with min -8 x scale, exactly,
    so the Q4_1 products run it; weights off its grid are not taken for one."""
    w = gguf_weight("q4_0", 40, 128, seed=4)
    assert quant.q4_1_tables(w) is None and quant.q8_0_tables(w) is None
    codes, scales = quant.q4_0_tables(w)
    assert torch.equal(scales[..., 1], -8 * scales[..., 0])
    assert torch.equal(quant.GGUFLinear("q4_1", codes, scales).dequantize(), w)
    nudged = w.clone()
    nudged[7, 50] = torch.nextafter(nudged[7, 50], torch.tensor(1e9))
    for off_grid in (nudged, torch.randn(40, 128), w / 3, gguf_weight("q4_1", 40, 128, seed=4)):
        assert quant.q4_0_tables(off_grid) is None


@needs_native_library
def test_keep_gguf_tables_keeps_a_q4_0_layer():
    w = gguf_weight("q4_0", 40, 128, seed=5)
    model = nn.Sequential(nn.Linear(128, 40))
    with torch.no_grad():
        model[0].weight.copy_(w)
    bias = model[0].bias.detach().clone()
    assert quant.keep_gguf_tables(model) == 1 and model[0].kind == "q4_1"
    assert torch.equal(model[0].dequantize(), w) and torch.equal(model[0].bias, bias)


@needs_native_library
def test_at_four_bits_a_q8_0_layer_is_left_to_int4_and_a_q4_1_layer_kept():
    """What load_transformers does for a GGUF at int4: the 4-bit layers stay their codes, the 8-bit ones are quantized
    to torch's int4 (at int8 both are kept)."""
    weights = gguf_weight("q8_0", 32, 64, seed=6), gguf_weight("q4_1", 32, 64, seed=7)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(64, 32))
    with torch.no_grad():
        for layer, w in zip(model, weights):
            layer.weight.copy_(w)
    assert quant.keep_gguf_tables(model, most_bits=4) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], quant.GGUFLinear) and model[1].kind == "q4_1"
    quant.quantize_model(model, "int4", group_size=32)
    assert isinstance(model[0], quant.Int4Linear) and isinstance(model[1], quant.GGUFLinear)
    assert torch.equal(model[1].dequantize(), weights[1])


@needs_native_library
@pytest.mark.parametrize("out_features", [300, 320])
@pytest.mark.parametrize("kind", TABLES)
def test_a_kept_gguf_layer_at_int8_or_int4_reads_prompts_in_bf16_and_decodes_in_fp32(kind, out_features):
    """quantize_model gives kept GGUF layers the quantized layers' activation dtype (bf16 on CPU) for prompts (a bf16
    GEMM of the weights dequantized a chunk at a time, where the CPU has a native one; on CPUs with AMX, native's AMX
    product up to AMX_MAX_ROWS_GGUF rows, out a multiple of 32); decode rows stay on the exact fp32 kernel. Not with
    exact, nor for a layer skipped (the output layer)."""
    w = gguf_weight(kind, out_features, 128, seed=8)
    model = nn.Sequential(quant.GGUFLinear(kind, *TABLES[kind](w)), quant.GGUFLinear(kind, *TABLES[kind](w)))
    exact = nn.Sequential(quant.GGUFLinear(kind, *TABLES[kind](w)))
    quant.quantize_model(model, "int4", skip=lambda name: name == "1")
    quant.quantize_model(exact, "int4", exact=True)
    assert model[0].prompt_dtype == torch.bfloat16
    assert model[1].prompt_dtype == exact[0].prompt_dtype == torch.float32
    rounded_weights = model[0].dequantize(scratch=torch.empty(w.numel(), dtype=torch.bfloat16))
    assert torch.equal(rounded_weights, w.bfloat16())   # the C dequantization rounds as torch does: nearest even
    amx = native.amx_library() is not None and out_features % 32 == 0
    for rows in (native.GGUF_MAX_ROWS + 24, native.AMX_MAX_ROWS_GGUF + 1):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        assert native.takes_gguf_amx(x.bfloat16(), model[0]) == (amx and rows <= native.AMX_MAX_ROWS_GGUF)
        fp32 = exact[0](x)
        assert torch.equal(model[1](x), fp32)
        decode = x[:native.GGUF_MAX_ROWS]
        assert torch.equal(model[0](decode), exact[0](decode))   # decode rows: fp32's kernel
        got = model[0](x).double()
        if quant.slow_half_gemm(torch.bfloat16):
            assert torch.equal(got, fp32.double())
        else:
            rounded = x.bfloat16().double()
            assert ((got - rounded @ w.double().t()).abs() <= error_bound(rounded, w.double(), torch.bfloat16)).all()
            assert not torch.equal(got, fp32.double())
        if native.takes_gguf_amx(x.bfloat16(), model[0]):   # the layer's product is native's
            assert torch.equal(got, native.gguf_matmul_amx(x.bfloat16(), model[0]).double())


@needs_native_library
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, native.GGUF_MAX_ROWS, native.GGUF_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("out_features, in_features", [(2, 32), (38, 96), (300, 576)])
@pytest.mark.parametrize("kind", TABLES)
def test_gguf_product_is_the_exact_weights_summed_in_fp32(kind, out_features, in_features, rows):
    """Rows in whole and partial passes of the kernel (4 at a time) up to GGUF_MAX_ROWS, then the dequantized GEMM."""
    w = gguf_weight(kind, out_features, in_features, seed=out_features + rows)
    module = quant.GGUFLinear(kind, *TABLES[kind](w))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    assert native.takes_gguf(x, module) == (rows <= native.GGUF_MAX_ROWS)
    y = module(x).double()
    ref = x.double() @ w.double().t()
    bound = error_bound(x.double(), w.double(), torch.float32)
    if kind == "q4_1":   # w = scale x code + min: the codes' products are up to |w| + |min|, min x sum(x) summed apart
        mins = module.scales[..., 1:].expand(-1, -1, 32).flatten(1).double().abs()
        bound += (in_features + 2) * 2.0 ** -24 * (x.double().abs() @ mins.t())
    assert ((y - ref).abs() <= bound).all()
    assert torch.equal(module(x[-1:]), module(x[-1:].repeat(2, 1))[:1])   # a row's product alone or with another
    assert module(x.bfloat16()).dtype == torch.bfloat16


ATTN_CHUNK = 256   # positions a work item of native's decode_attention takes (kernels/matmul_avx2.c)


@needs_native_library
@pytest.mark.parametrize("heads, groups, d, lengths", [(9, 3, 64, [1, 5, 256, 257, 2000]), (32, 2, 128, [17, 700]),
                                                       (4, 4, 8, [3])])
def test_decode_attention_is_attention_in_fp32_for_every_sequence_at_once(heads, groups, d, lengths):
    """One new row per sequence against caches of other lengths (chunk edges included), KVCache tensors of two layers
    with room past the written positions, the new rows taken from a fused q/k/v product's views as the model passes
    them (one row of it not a decode step), against float64 attention. The new keys and values land at each cache's
    last position. The bound follows the arithmetic: each score a dot product of d fp32 terms (then scaled), exp
    within 2 ulp, a chunk's exponentials and weighted values summed in fp32 over at most ATTN_CHUNK positions, chunks
    combined."""
    g = torch.Generator().manual_seed(heads + d)
    caches = [torch.randn(2, 2, groups, -(-n // 256) * 256, d, generator=g) for n in lengths]
    before = [c.clone() for c in caches]
    qkv = torch.randn(len(lengths) + 1, heads + 2 * groups, d, generator=g) * 2   # row 0: another segment's
    q = qkv[:, :heads].transpose(0, 1)
    k, v = qkv[:, heads:heads + groups].transpose(0, 1), qkv[:, heads + groups:].transpose(0, 1)
    rows = torch.arange(1, len(lengths) + 1)
    assert native.takes_decode_attention(q, k, v, caches)
    plan = native.decode_attention_plan(caches, lengths)
    got = native.decode_attention(plan[1], rows, q, k, v).double()
    u, scale = 2.0 ** -24, d ** -0.5
    for i, (cache, n) in enumerate(zip(caches, lengths)):
        assert torch.equal(cache[0], before[i][0])   # layer 0 untouched
        assert torch.equal(cache[1, 0, :, n - 1], k[:, i + 1]) and torch.equal(cache[1, 1, :, n - 1], v[:, i + 1])
        assert torch.equal(cache[1, :, :, :n - 1], before[i][1, :, :, :n - 1])
        keys, values = cache[1, 0, :, :n].double(), cache[1, 1, :, :n].double()
        qi = q[:, i + 1].double().view(groups, heads // groups, d)
        ref = torch.softmax(qi @ keys.transpose(1, 2) * scale, -1) @ values   # [groups, per, d]
        chunks = -(-n // ATTN_CHUNK)
        score_error = 1.01 * (d + 2) * u * scale * (qi.abs() @ keys.abs().transpose(1, 2)).amax()
        relative = 2 * score_error + (min(n, ATTN_CHUNK) + chunks + 8) * u
        bound = values.abs().max().item() * (relative + (min(n, ATTN_CHUNK) + chunks + 2) * u) * 1.01
        assert (got[i] - ref.reshape(-1)).abs().max() <= bound, i
        alone = native.decode_attention(native.decode_attention_plan([cache], [n])[1], rows[i:i + 1], q, k, v)
        assert torch.equal(alone[0], got[i].float())   # the same alone or beside other sequences


@needs_native_library
@pytest.mark.parametrize("round_first", [False, True])
@pytest.mark.parametrize("rows, n", [(1, 576), (3, 64), (513, 4096), (2, 100)])
def test_native_rms_norm_is_torchs_bit_for_bit(rows, n, round_first, monkeypatch):
    """model.RMSNorm on fp32 rows runs native.rms_norm: the same values as its torch ops, to the bit (a norm that sums
    its squares in another order flips bf16 roundings downstream and moved the v2_int8 fixture off its gate)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    norm = RMSNorm(n, 1e-5)
    norm.round_first = round_first
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=g))
    assert native.takes_rms_norm(x, norm.weight)
    got = norm(x)
    monkeypatch.setattr(native, "takes_rms_norm", lambda *args: False)
    assert torch.equal(got, norm(x))


@needs_native_library
def test_keep_gguf_tables_shrinks_gguf_weights_and_keeps_the_logits(monkeypatch):
    """A tied Q8_0 table (embedding and output layer), a Q4_1 layer with a bias (used twice), and plain fp32 layers
    that stay as they are."""
    torch.manual_seed(5)
    model = TinyLM().eval()
    with torch.no_grad():
        model.embed.weight.copy_(gguf_weight("q8_0", 50, 64, seed=2))
        model.shared.weight.copy_(gguf_weight("q4_1", 64, 64, seed=3))
    plain = TinyLM().eval()
    ids = torch.arange(50)
    plain_bias = model.shared.bias.detach().clone()
    with torch.no_grad():
        before = model(ids)
        assert quant.keep_gguf_tables(model) == 2 and quant.keep_gguf_tables(plain) == 0
        after = model(ids)
        monkeypatch.setattr(native, "takes_gguf", lambda x, module: False)
        without_kernel = model(ids)
    assert isinstance(model.embed, quant.Int8Embedding) and isinstance(model.lm_head, quant.GGUFLinear)
    assert model.lm_head.qweight is model.embed.qweight and model.lm_head.scales is model.embed.scales
    assert isinstance(model.shared, quant.GGUFLinear) and model.shared.kind == "q4_1" and model.again is model.shared
    assert torch.equal(model.shared.bias, plain_bias)
    assert type(model.proj_out) is nn.Linear   # not a GGUF tensor: stays
    assert type(plain.embed) is nn.Embedding and type(plain.lm_head) is nn.Linear and type(plain.shared) is nn.Linear
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())   # fp32 sums reordered
    torch.testing.assert_close(without_kernel, after, rtol=0, atol=1e-5 * before.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it on a lent GPU machine)")
def test_cuda_products_match_the_reference():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(6)).cuda()
    int8 = quant.quantize_linear(w, None, "int8")
    codes, scales_and_zeros = quant._quantize_int4(w, 128, torch.bfloat16)   # the CUDA kernel's scale dtype
    int4 = quant.quantize_linear(w, None, "int4")
    int4_reference = quant.Int4Linear(codes.cpu(), scales_and_zeros.cpu(), 128, None)  # same parameters, CPU layout
    for module, reference in ((int8, int8.dequantize().cpu()), (int4, int4_reference.dequantize())):
        for rows in (1, 300):
            x = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
            expected = x.float().cpu().mm(reference.t())
            torch.testing.assert_close(module.half()(x).float().cpu(), expected, atol=0.25, rtol=0.02)


# -- every shape a config can declare: the sweep ------------------------------------------------------------------

SWEEP_ROWS = (1, 2, 3, 5, 8, 17, 64, quant.dense_min_rows() - 1, quant.dense_min_rows())


def sweep_cases() -> list[dict]:
    """Odd widths (not multiples of 8, 16, 32 or 64) beside kernel-friendly ones, each row count from decode to
    the dense path, int8 and int4 (quantized here and official), bf16 activations (the fast path) and fp32 (exact)."""
    cases = []
    widths = [(96, 200), (64, 100), (17, 24), (3, 40), (48, 136), (160, 96), (32, 4104), (200, 72), (16, 320),
              (96, 384), (224, 512),   # int4 groups of 128 and 256 on 32-row blocks (native's int4)
              (128, 320)]              # whole 64-row blocks: AMX CPUs' int4 decode kernels
    kinds = [("int8", False, None), ("int4", False, 32), ("int4", False, 128), ("int8", True, None), ("int4", True, None)]
    for (out, inp), (precision, official, group), activation, rows in itertools.product(
            widths, kinds, ("bfloat16", None), SWEEP_ROWS):
        if official and precision == "int4" and inp % 2:
            continue
        cases.append({"id": len(cases), "out": out, "in": inp, "precision": precision, "official": official,
                      "group": group, "activation": activation, "rows": rows})
    return cases


def run_sweep(cases: list[dict], threads: int) -> tuple[str, dict[int, str]]:
    """Run the cases in child processes; a case that kills its child is reported as a crash and the rest go on."""
    results: dict[int, str] = {}
    capability = ""
    todo = cases
    while todo:
        child = subprocess.run([sys.executable, str(ROOT / "tests" / "quant_sweep.py"), str(threads)], cwd=ROOT,
                               input="".join(json.dumps(c) + "\n" for c in todo), capture_output=True, text=True,
                               timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        started = None
        for line in child.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "capability":
                capability = rest
            elif word == "start":
                started = int(rest)
            else:
                results[int(word)], started = rest, None
        if started is None and len(results) < len(cases) and child.returncode:
            raise AssertionError(f"the sweep child failed outside a case: {child.stderr[-2000:]}")
        if started is not None:
            results[started] = f"crash (exit {child.returncode})"
        todo = [c for c in todo if c["id"] not in results]
    return capability, results


@pytest.mark.parametrize("threads", [1, 2])
def test_every_odd_shape_is_correct_and_never_crashes(threads):
    cases = sweep_cases()
    capability, results = run_sweep(cases, threads)
    assert capability == torch.backends.cpu.get_cpu_capability()
    bad = [f"{c} -> {results[c['id']]}" for c in cases if not results[c["id"]].startswith("ok")]
    assert not bad, f"{len(bad)} of {len(cases)} shapes on {capability}:\n" + "\n".join(bad[:20])
    # the sweep reached both products: the fused kernels below dense_min_rows() and int4 where the shape allows
    assert any("Int4Linear" in r for r in results.values()) and any("Int8Linear" in r for r in results.values())


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the unpadded int8 kernel is wrong on the AVX2 and AVX-512 paths only")
def test_the_sweep_catches_the_unpadded_int8_kernel():
    """Without the padding (the code before it), K=100 in bf16 crashes the child or comes out wrong: the sweep sees it,
    and goes on after each crash. (From 2 rows on it crashes on both paths; one row reads past the weight and is wrong
    or right by chance.) Each crash costs a new child (about 2 s of importing torch): four cases."""
    cases = [{"id": i, "out": out, "in": 100, "precision": "int8", "official": official, "group": None,
              "activation": "bfloat16", "rows": rows, "int8_kernel_k_multiple": 1}
             for i, (out, official, rows) in enumerate(((64, False, 2), (96, True, 2), (64, True, 5), (96, False, 5)))]
    _, results = run_sweep(cases, threads=2)
    assert all(not r.startswith("ok") for r in results.values()), results


@pytest.mark.parametrize("pad_min_weights", [0, quant.PAD_MIN_WEIGHTS])
def test_linears_on_onednn_give_the_same_products(pad_min_weights, monkeypatch):
    """route_linears (oneDNN's packed weights where they are the faster product, see quant) changes only the
    summation order: within K * 2^-24 * sum |x||w| of nn.Linear in fp32, and in bf16 within the rounding of the
    output (2^-8 relative) plus K * 2^-24 * sum |x||w|, for decode rows (padded to PACKED_MIN_ROWS), prefill rows
    and batched 3-D inputs. A
    weight tied to an embedding stays as it is. pad_min_weights 0: every weight takes the padded decode product."""
    monkeypatch.setattr(quant, "PAD_MIN_WEIGHTS", pad_min_weights)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = nn.Sequential(nn.Linear(200, 77), nn.Linear(77, 5, bias=False), nn.Linear(200, 64)).to(dtype)
        table = nn.Embedding(64, 200).to(dtype)
        model[2].weight = table.weight
        holder = nn.ModuleDict({"model": model, "table": table})
        inputs = [torch.randn(1, 200), torch.randn(130, 200), torch.randn(2, 3, 200), torch.randn(2, 1, 200)]
        inputs = [x.to(dtype) for x in inputs]
        with torch.no_grad():
            expected = [model[1](model[0](x)) for x in inputs]
            mids = [model[0](x).float() for x in inputs]
            w0, w1, b0 = (t.detach().float().abs() for t in (model[0].weight, model[1].weight, model[0].bias))
            routed = quant.route_linears(holder)
            packs = quant.packs_for_onednn(dtype)
            assert routed == (2 if packs else 0)
            assert [type(m) for m in model] == [quant.OneDnnLinear if packs else nn.Linear] * 2 + [nn.Linear]
            assert model[2].weight is table.weight
            for x, mid, want in zip(inputs, mids, expected):
                got = model[1](model[0](x))
                magnitude = (x.float().abs() @ w0.t() + b0) @ w1.t()
                bound = 4 * 200 * 2.0 ** -24 * magnitude
                if dtype == torch.bfloat16:   # both round the first layer's output, then the second's
                    bound = bound + 2.0 ** -7 * (mid.abs() @ w1.t()) + 2.0 ** -8 * want.float().abs() * 2
                assert got.shape == want.shape and ((got.float() - want.float()).abs() <= bound + 1e-30).all()