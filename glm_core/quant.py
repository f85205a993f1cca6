"""Weight-only INT8 / INT4 linear layers on torch's own kernels.

INT8: symmetric per output channel (`scale = max|w| / 127`), product by `aten._weight_int8pack_mm`.
INT4: torch's group-wise format (codes 0..15, `w = (code - 8) * scale + zero` per group of input columns),
product by `aten._weight_int4pack_mm_for_cpu` (CPU) or `aten._weight_int4pack_mm` (CUDA, bf16 only).
The official ChatGLM INT4 format (per-channel symmetric, values -7..7) is the special case zero = 0 with
the channel scale repeated over every group, so its dequantized weights are exactly `float(scale) * q`.

`activation_dtype` is what a layer rounds its input to before the product (None: the input's own dtype).
On CPU quantized layers take bf16, the only dtype torch's CPU kernels are fast in (fp32 input runs them 8-100x
slower: one 27392 x 4096 official int4 layer, one row, 911 ms in fp32 against 9.4 ms in bf16), while the
model around them keeps fp32: only the product's input is rounded, and sums are fp32. With None, fp32 input
gives the official CPU arithmetic op for op (checkpoint.load_model's `exact`).

Which product runs on CPU: on torch's AVX2 path, bf16 input takes GLM Studio's own products (glm_core.native) at
every row count int4 has and int8 has from INT8_TILED_MIN_ROWS on (and at one row): 1.3-1.8x faster than torch's
kernels in decode, 1.2-1.9x faster than the dense path in prefill. On CPUs with AMX bf16 input from a few rows up to
native.AMX_MAX_ROWS (batched decode, short prompts, a prompt read beside running replies) takes GLM Studio's AMX
products, which dequantize in tiles that stay in L1 (2-3x faster than torch's kernels and the dense path from 8 to
128 rows; official checkpoints' layers only where the dense path would run), and fewer int4 rows its AVX-512 decode
kernels (activations quantized per block of 32: int8 in the layers quantized here, int16 in official checkpoints'
layers). Otherwise fewer than dense_min_rows() rows in bf16/fp16 (decode) take torch's fused kernel; more rows
(prefill) and fp32 take the dense path, which dequantizes DENSE_CHUNK_ELEMENTS weights at a time for a GEMM: in bf16
where the CPU has native bf16 (by glm_core.native's one-pass kernels where the CPU has AVX2, 2-4x faster than
elementwise torch), else in fp32, which there beats both the fused kernels and a bf16 GEMM (measured 1.7x / 5x at
512 rows on a 2-core AVX2 EPYC; the fp32 GEMM is oneDNN's on AMD CPUs, matmul_fp32). On CUDA int4 runs the bf16
tinygemm kernel; int8 dequantizes and matmuls in the input dtype, because the CUDA `_weight_int8pack_mm` (torch
2.11, H100) was 9x slower than that for one row and 600x for 512.

Scales and zeros are kept in the activation dtype (else the input's), so the kernels take them as they are;
they follow `module.to(dtype)` like the bias, so cast a model before quantizing it, not after.

Where the fused CPU kernels are correct (torch 2.13). Found by a sweep of every (kernel, input dtype, rows M,
out_features N, in_features K) over M in 1..128, N in 1..200, K in 1..4104 with odd values (not multiples of
8/16/32/64), each case in a child process so a crash is a result, against x @ dequantized(W).T in float64, on the
AVX-512 path and on the AVX2 path (ATEN_CPU_CAPABILITY=avx2 on the same AVX-512 Zen 4); tests/test_quant.py keeps
sweeping the modules' products under both paths:
- `_weight_int8pack_mm`, bf16 input: correct only when K is a multiple of 16 (AVX-512 path) or 8 (AVX2 path);
  any other K crashes the process (SIGSEGV, e.g. M=2 N=96 K=200) or returns inf / wrong values (M=1 N=64 K=100).
  fp16 and fp32 input, and the scalar path (ATEN_CPU_CAPABILITY=default): correct for every K. M and N: any.
  So Int8Linear pads its weight with zero columns to a multiple of INT8_KERNEL_K_MULTIPLE (16, both paths) when
  it is built, and the fused product pads its input the same way: zeros add nothing to the sums.
- `_weight_int4pack_mm_for_cpu`: correct for every M and N and each input dtype on both paths whenever
  `_convert_weight_to_int4pack_for_cpu` accepts the weight (N a multiple of 16; it raises otherwise) and K is a
  multiple of the group size (32, 64, 128 or 256). int4_group_size sends every other shape to Int8Linear.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native

INT4_GROUP_SIZES = (256, 128, 64, 32)  # the group sizes the int4 kernels accept, largest first
DENSE_MIN_ROWS = 128                    # CPU: from this many rows on, dequantize + GEMM beats torch's fused kernels
DENSE_MIN_ROWS_AMX = 24                 # ... where AMX runs the bf16 GEMM and glm_core.native dequantizes (see below)
DENSE_CHUNK_ELEMENTS = 4 << 20          # weights dequantized at a time (16 MB in fp32): bounded scratch, in cache
PACKED_MIN_ROWS = 4                     # rows oneDNN's packed products of large weights get at least (OneDnnLinear)
PAD_MIN_WEIGHTS = 1 << 24               # ... large: 16M weights (every 6B block product; SmolLM2's output layer is 28M)
INT8_KERNEL_K_MULTIPLE = 16            # _weight_int8pack_mm with bf16 input needs K % 16 (AVX-512), % 8 (AVX2)
GGUF_BLOCK = 32                         # columns per scale of GGUF's Q8_0 and Q4_1 tensors
QUANTIZE_ROWS = 256                     # rows quantized at a time: 4 MB of fp32 scratch stays in cache (2x faster than
                                        # 2048 rows on a 2-core EPYC); whole int4 CPU blocks


@functools.cache
def dense_min_rows() -> int:
    """Rows from which a CPU product dequantizes for a GEMM. On a 2-core AMX Xeon (bf16 GEMM 4-5x a Zen 4's) with the
    one-pass dequantization, dense against fused at 16 / 20 / 24 rows, best of 7, ms: int4 27392 x 4096 29.3 / 25.7 /
    25.8 against 19.6 / 24.4 / 29.4, 4096 x 13696 13.0 / 13.0 / 11.5 against 9.5 / 11.8 / 14.2; int8 27392 x 4096
    22.8 / 23.0 / 23.2 against 21.1 / 26.4 / 31.2. DENSE_MIN_ROWS was measured on a Zen 4 with torch's elementwise
    dequantization."""
    amx = torch.cpu._is_amx_tile_supported() and not slow_half_gemm(torch.bfloat16)
    return DENSE_MIN_ROWS_AMX if amx and native.library() is not None else DENSE_MIN_ROWS


@functools.cache
def slow_half_gemm(dtype: torch.dtype) -> bool:
    """True where torch has no oneDNN kernel for bf16/fp16 matmul on this CPU (AVX2 only): there such a GEMM
    runs about 10x slower than fp32, while a GEMV (decode) is fine."""
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported()


@functools.cache
def onednn_for_fp32_linears() -> bool:
    """Whether fp32 linears on this CPU run through oneDNN rather than torch's default, MKL. MKL takes slower code
    paths on CPUs not made by Intel: on a 2-core AMD EPYC (Zen 5, torch 2.13, weights streamed from memory) its
    products read 11-14 GB/s whatever the rows or threads, oneDNN's 29-33 GB/s: 1.3-3.2x faster from 1 to 32 rows,
    1.8-2.2x at 512, the same with both held to AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). On Intel CPUs
    MKL stays: on a 2-core AMX Xeon the embedded model (fp32) decoded 15.2-17.9 tok/s with MKL, 12.1-13.8 with
    oneDNN's packed weights, three alternating pairs."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False
    return not intel and torch.backends.mkldnn.is_available()


def matmul_fp32(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, in] @ weight[out, in].T for fp32 CPU tensors: through oneDNN where onednn_for_fp32_linears says so, else
    torch.mm (MKL). The prefill paths that dequantize or upcast weights into fp32 scratch multiply here: on a 2-core
    Zen 2 (AVX2) oneDNN ran [512 x 4096] @ [4096 x 27392] at 149 GFLOP/s against MKL's 98, and 64 rows at 133 against
    48."""
    if onednn_for_fp32_linears():
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return x.mm(weight.t())


def packs_for_onednn(dtype: torch.dtype) -> bool:
    """Whether CPU linears of this dtype get oneDNN's packed weights: fp32 where oneDNN beats MKL (above), bf16
    wherever the CPU has native bf16 (bf16 products run on oneDNN there anyway; elsewhere they are upcast)."""
    if dtype == torch.float32:
        return onednn_for_fp32_linears()
    return dtype == torch.bfloat16 and not slow_half_gemm(dtype)


class OneDnnLinear(nn.Linear):
    """A CPU nn.Linear whose weight is held in oneDNN's own blocked layout (an opaque tensor: no data pointer, no
    elementwise ops), inference only. One row on a 2-core Zen 4, weights streamed from memory: bf16 27392 x 4096
    14.8 -> 7.5 ms, 4096 x 13696 5.5 -> 4.3 ms; fp32 49152 x 576 5.2 -> 3.8 ms, against the same oneDNN product
    on the plain weight (BENCHMARKS.md); 512 rows: the same time. Fewer than PACKED_MIN_ROWS rows are padded with
    zero rows to that many on weights of PAD_MIN_WEIGHTS or more: oneDNN's kernel for 4 rows streams the weight
    1.2-1.4x faster than its kernel for one (bf16, each of the 6B block's four shapes), and the arithmetic is idle on
    2 cores anyway; on the embedded model's small products the padding's own ops cost more (decode 7-10 % slower)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if rows >= PACKED_MIN_ROWS or self.in_features * self.out_features < PAD_MIN_WEIGHTS:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        padded = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, PACKED_MIN_ROWS - rows))
        y = torch.ops.mkldnn._linear_pointwise(padded, self.weight, self.bias, "none", [], "")
        return y[:rows].reshape(*x.shape[:-1], self.out_features)

    def pack(self, weight: Tensor) -> None:
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach()), requires_grad=False)

    # a state dict holds the plain weight, as any nn.Linear's
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight.detach().to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.weight = nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.pack(self.weight)


class NativeBf16Linear(nn.Linear):
    """A CPU bf16 nn.Linear left plain for native.bf16_decode, where the CPU has AVX-512 bf16: decode rows run there
    (and short prompts' in native's AMX product where the CPU has AMX: native.takes_bf16), more rows through torch's
    product on the plain weight (oneDNN's). One row, weights streamed from memory, on a 2-core AMX Xeon, ms: 27392 x
    4096 7.6 against 8.4 for oneDNN's packed weight, 4096 x 13696 3.2 against 4.6, 4608 x 4096 1.2 against 1.6; 512
    rows, oneDNN on the plain weight against the packed one: 59-62 against 55-59, 29-32 against 30-33, 9.3-10.3
    against 9.5-10.7 (BENCHMARKS.md). (glm_core.model.linear sends the native models' layers the same way.)"""

    def forward(self, x: Tensor) -> Tensor:
        y = native_bf16_linear(self, x)
        return super().forward(x) if y is None else y


def native_bf16_linear(layer: nn.Linear, x: Tensor) -> Tensor | None:
    """layer(x) [..., in] through native.bf16_matmul where native.takes_bf16 takes its rows (fp32 sums, the bias
    added, one rounding to x's dtype), else None."""
    rows = x.reshape(-1, layer.in_features)
    if not native.takes_bf16(rows, layer.weight):
        return None
    y = native.bf16_matmul(rows, layer.weight)
    y = y if layer.bias is None else y + layer.bias
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def route_linears(model: nn.Module) -> int:
    """Give the model's CPU linears oneDNN's packed weights where packs_for_onednn says so, or leave bf16 ones plain
    for native.bf16_decode where it takes them (NativeBf16Linear); returns how many. A weight another module also
    uses (an embedding table tied to the output layer) stays as it is."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for tensor in module._parameters.values():
            if tensor is not None:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    routed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (type(module) is nn.Linear and weight.device.type == "cpu" and uses[id(weight)] == 1):
            continue
        if native.decodes_bf16(weight):
            module.__class__ = NativeBf16Linear
        elif packs_for_onednn(weight.dtype):
            module.__class__ = OneDnnLinear
            module.pack(weight)
        else:
            continue
        routed += 1
    return routed


def storage_key(tensor: Tensor) -> int:
    """What tells tensors sharing memory apart: the data pointer, or the tensor itself for an opaque oneDNN one."""
    return id(tensor) if tensor.is_mkldnn else tensor.data_ptr()


def _as_bias(bias: Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)


def _dense_matmul(x: Tensor, module: nn.Module) -> Tensor:
    """x [M, in] @ W.T with W dequantized. fp32 runs as one product on W [out, in], the official CPU code op for op;
    accelerators run one product in the input dtype. On CPU half inputs are multiplied in their dtype where the
    CPU has a native half GEMM, else in fp32 (a fast GEMM on every CPU), a chunk of output rows at a time into one
    scratch buffer reused for every chunk: the weight is written where the cache already holds it (a fresh
    tensor per chunk made int4's dequantization 3x slower: page faults, not arithmetic)."""
    if x.dtype == torch.float32:
        return x.mm(module.dequantize(torch.float32).contiguous().t())
    if x.device.type != "cpu":
        return x.mm(module.dequantize(x.dtype).t())
    dtype = torch.float32 if slow_half_gemm(x.dtype) else x.dtype
    x = x.to(dtype)
    rows = max(64, DENSE_CHUNK_ELEMENTS // module.in_features // 64 * 64)  # on int4 block edges (32 or 64 rows)
    rows = min(rows, module.out_features)
    scratch = Scratch(torch.empty(rows * module.in_features, dtype=dtype),
                      torch.empty(rows * module.in_features, dtype=torch.uint8))
    out = torch.empty(x.shape[0], module.out_features, dtype=dtype)
    for start in range(0, module.out_features, rows):
        stop = min(start + rows, module.out_features)
        weight = module.dequantize(dtype, start, stop, scratch)
        out[:, start:stop] = matmul_fp32(x, weight) if dtype == torch.float32 else x.mm(weight.t())
    return out


@dataclass
class Scratch:
    """Flat buffers a chunked dequantization writes into, chunk after chunk: the weight (in the GEMM's dtype) and
    the int4 codes."""
    weight: Tensor
    codes: Tensor


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the input's rounding, the choice of product, the bias.

    `official`: a layer of an official pre-quantized checkpoint, whose fast path is held to the official code's
    logits (within 3 % of the largest, 99 % of the same argmax on the fixtures): its products keep bf16 activations
    (AMX CPUs' int4: int16, exact within 2^7 of each block's largest value; the fixture's largest difference went from
    1.7 % to 1.2 %) and take the fused kernels below DENSE_MIN_ROWS rows. Layers GLM Studio quantizes trade a little
    of that for speed: int4 multiplies activations quantized to int8 in glm_core.native's products (AVX2 from 2 rows:
    1.4-1.75x faster on a Zen 2, the fixture's logits went to 3.5 %; AMX CPUs' decode, 1 to 19 rows: 1.35x for one
    row, 2x for 8), and AMX CPUs dequantize for a GEMM from dense_min_rows() (the fixture's argmax agreed at 97.5 %
    with its 40-token sequence in bf16 weights)."""

    in_features: int
    out_features: int
    unpackable = True   # whether dequantize() can read the weights back (Int4Linear: only known CPU layouts)

    def __init__(self, bias: Tensor | None, activation_dtype: torch.dtype | None, official: bool):
        super().__init__()
        self.bias = _as_bias(bias)
        self.activation_dtype = activation_dtype
        self.official = official

    def fused(self, x: Tensor) -> Tensor:
        """The product without a dequantized copy of the weight: GLM Studio's own where native_takes, else torch's."""
        raise NotImplementedError

    def native_takes(self, x: Tensor) -> bool:
        """Whether glm_core.native runs this product for x."""
        raise NotImplementedError

    def amx_takes(self, x: Tensor) -> bool:
        """Whether glm_core.native's AMX product runs this product for x."""
        raise NotImplementedError

    def amx_product(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        xa = x2 if self.activation_dtype is None else x2.to(self.activation_dtype)
        fused_below = DENSE_MIN_ROWS if self.official else dense_min_rows()
        decode = x.device.type == "cpu" and xa.dtype != torch.float32 and x2.shape[0] < fused_below
        # official layers keep their fused kernels (their held arithmetic) and take AMX where the dense path ran
        if (not self.official or not decode) and self.amx_takes(xa):
            y = self.amx_product(xa)
        elif decode or not self.unpackable or self.native_takes(xa):   # CUDA int4 is never unpackable
            y = self.fused(xa.contiguous())
        else:
            y = _dense_matmul(xa, self)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias  # after the product, as the official code adds it
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    """y = x @ (scale * q).T + bias with q int8 [out, in] and one scale per output row."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None,
                 activation_dtype: torch.dtype | None = None, official: bool = False):
        super().__init__(bias, activation_dtype, official)
        self.out_features, self.in_features = qweight.shape
        qweight = qweight.to(torch.int8)
        # K the fused CPU kernel can take (see the module docstring): zero columns, decided here once
        self.kernel_pad = -self.in_features % INT8_KERNEL_K_MULTIPLE if qweight.device.type == "cpu" else 0
        if self.kernel_pad:
            qweight = F.pad(qweight, (0, self.kernel_pad))
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None,
                   scratch: Scratch | None = None) -> Tensor:
        """W[start:stop] [rows, in], in scratch.weight when given."""
        stop = self.out_features if stop is None else stop
        if native.dequantizes_int8(self, dtype):
            return native.int8_dequantize_bf16(self, start, stop, None if scratch is None else scratch.weight)
        q = self.qweight[start:stop, :self.in_features]
        scales = self.scales[start:stop, None].to(dtype)
        if scratch is None:
            return q * scales  # one pass: int8 * float promotes to float
        w = scratch.weight[:q.numel()].view(q.shape)
        return torch.mul(q, scales, out=w)

    def native_takes(self, x: Tensor) -> bool:
        return native.takes_int8(x, self)

    def amx_takes(self, x: Tensor) -> bool:
        return native.takes_int8_amx(x, self)

    def amx_product(self, x: Tensor) -> Tensor:
        return native.int8_matmul_amx(x, self)

    def fused(self, x: Tensor) -> Tensor:
        if self.native_takes(x):
            return native.int8_matmul(x, self.qweight, self.scales)
        if self.kernel_pad:
            x = F.pad(x, (0, self.kernel_pad))
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows with one scale per row ([rows]) or per block of GGUF_BLOCK columns ([rows,
    columns / GGUF_BLOCK], a GGUF Q8_0 tensor's layout): a lookup dequantizes only the rows it takes (fp32)."""

    def __init__(self, qweight: Tensor, scales: Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def quantize(cls, weight: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> "Int8Embedding":
        return cls(*_quantize_int8(weight, scale_dtype))

    def forward(self, ids: Tensor) -> Tensor:
        rows, scales = self.qweight[ids].float(), self.scales[ids].float()
        if self.scales.dim() == 2:
            return (rows.unflatten(-1, (-1, GGUF_BLOCK)) * scales[..., None]).flatten(-2)
        return rows * scales[..., None]

    def as_linear(self, activation_dtype: torch.dtype | None) -> nn.Module:
        """The same table as an output layer (tied weights), sharing its tensors: no bytes added (unless the width
        needs the fused kernel's padding, see Int8Linear). Block scales: a GGUFLinear (fp32 activations)."""
        if self.scales.dim() == 2:
            return GGUFLinear("q8_0", self.qweight, self.scales)
        return Int8Linear(self.qweight, self.scales, None, activation_dtype)


class GGUFLinear(nn.Module):
    """y = x @ W.T on CPU with W a GGUF block tensor kept as stored, which q8_0_tables / q4_1_tables / q4_0_tables
    recover exactly from the fp32 weights transformers dequantizes a GGUF into: `kind` "q8_0" (int8 codes [out, in],
    one fp32 scale per block of GGUF_BLOCK inputs [out, in / GGUF_BLOCK]) or "q4_1" (4-bit codes [out, in /
    GGUF_BLOCK, 16] in GGUF's nibble order, (scale, min) pairs [out, in / GGUF_BLOCK, 2]; Q4_0 too, its min -8 x
    scale). The embedded model in fp32 is such weights: its Q4_1 layers and Q8_0 output layer take 112 MB so, 538 MB
    as fp32. Products in fp32 on glm_core.native's kernel up to native.GGUF_MAX_ROWS rows (one row against the 49152 x
    576 Q8_0 output layer, streamed from memory, on a 2-core AMX Xeon: 1.8 ms against 4.3 for its fp32 weights); more
    rows (prompts) dequantize a chunk at a time for an fp32 GEMM, or, with `prompt_dtype` bf16 (the layer kept at
    int8 / int4: quantize_model), a bf16 GEMM where the CPU has a native one (the embedded model's 512-token prompt
    2.0-2.2x faster on a 2-core AMX Xeon; top-1 agreement with fp32 99.2 %), or, on CPUs with AMX, native's AMX
    product of the same bf16 weights dequantized a chunk at a time in L1 (native.takes_gguf_amx)."""

    def __init__(self, kind: str, qweight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.kind = kind
        self.prompt_dtype = torch.float32   # bf16: prompts' GEMMs in bf16 where it is native (the layer at int8/int4)
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * GGUF_BLOCK
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = _as_bias(bias)

    def dequantize(self, start: int = 0, stop: int | None = None, scratch: Tensor | None = None) -> Tensor:
        """W[start:stop] in fp32, exactly the weights the codes came from; in scratch's memory and dtype when given
        (bf16: those weights rounded)."""
        stop = self.out_features if stop is None else stop
        if native.dequantizes_gguf(self):
            return native.gguf_dequantize(self, start, stop, scratch)
        scales = self.scales[start:stop]
        if self.kind == "q8_0":
            w = (self.qweight[start:stop].unflatten(-1, (-1, GGUF_BLOCK)).float() * scales[..., None]).flatten(-2)
        else:
            packed = self.qweight[start:stop]
            codes = torch.cat([packed & 15, packed >> 4], dim=-1).float()   # low nibbles: columns 0-15 of the block
            w = (codes * scales[..., :1] + scales[..., 1:]).flatten(-2)
        return w if scratch is None else scratch[:w.numel()].view_as(w).copy_(w)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = native.gguf_matmul(x2, self) if native.takes_gguf(x2, self) else self._prompt_product(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _prompt_product(self, x2: Tensor) -> Tensor:
        """x2 @ W.T for more rows than the decode kernel takes: in bf16 with prompt_dtype bf16 where the CPU has a
        native bf16 GEMM (native's AMX product where it takes them), else chunks dequantized for fp32 GEMMs."""
        half = self.prompt_dtype == torch.bfloat16 and not slow_half_gemm(torch.bfloat16)
        xs = x2.to(torch.bfloat16) if half else x2
        if native.takes_gguf_amx(xs, self):
            return native.gguf_matmul_amx(xs, self)
        y = torch.empty(x2.shape[0], self.out_features, dtype=xs.dtype, device=x2.device)
        step = max(1, DENSE_CHUNK_ELEMENTS // self.in_features)
        scratch = torch.empty(min(step, self.out_features) * self.in_features, dtype=xs.dtype)   # reused: in cache
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            w = self.dequantize(start, stop, scratch)
            y[:, start:stop] = xs.mm(w.t()) if half else matmul_fp32(x2, w)
        return y


def q8_0_tables(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """(int8 codes, fp32 scales [rows, columns / GGUF_BLOCK]) that give this fp32 weight back exactly, as a GGUF Q8_0
    tensor dequantized does (llama.cpp's quantizer makes each block's largest code +-127, so scale = largest |w| / 127,
    and code x scale is exact in fp32); None when the weight is not such a tensor."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % GGUF_BLOCK:
        return None
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], weight.shape[1] // GGUF_BLOCK, dtype=torch.float32, device=weight.device)
    for start, rows in _row_chunks(weight):
        blocks = rows.unflatten(-1, (-1, GGUF_BLOCK))
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        q = (blocks / scale.masked_fill(scale == 0, 1)).round()
        if not torch.equal(q * scale, blocks):
            return None
        codes[start:start + len(rows)] = q.flatten(-2)
        scales[start:start + len(rows)] = scale[..., 0]
    return codes, scales


def q4_1_tables(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """(4-bit codes [rows, columns / GGUF_BLOCK, 16] in GGUF's nibble order, fp32 (scale, min) pairs [rows, columns /
    GGUF_BLOCK, 2]) that give this fp32 weight back exactly, as a GGUF Q4_1 tensor dequantized does: llama.cpp's
    quantizer gives each block's smallest weight code 0 and its largest 15, its fp16 min is the smallest weight and
    its fp16 scale the nearest to (largest - smallest) / 15; code x scale is exact in fp32 and the min's add rounds
    once. None when the weight is not such a tensor."""
    def grid(blocks: Tensor) -> tuple[Tensor, Tensor]:
        low = blocks.amin(-1, keepdim=True)
        return ((blocks.amax(-1, keepdim=True) - low) / 15).half().float(), low
    return _four_bit_tables(weight, grid)


def q4_0_tables(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """q4_1_tables' tables for a GGUF Q4_0 tensor, w = (code - 8) x fp16 scale: llama.cpp's quantizer gives each block's
    largest-magnitude weight code 0, so the scale is that weight / -8, and the min -8 x scale. code x scale + min gives
    the weight back exactly (both terms and their sum are multiples of the scale that fp32 holds). None when the
    weight is not such a tensor."""
    def grid(blocks: Tensor) -> tuple[Tensor, Tensor]:
        scale = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)) / -8
        return scale, -8 * scale
    return _four_bit_tables(weight, grid)


def _four_bit_tables(weight: Tensor, grid) -> tuple[Tensor, Tensor] | None:
    """q4_1_tables' tables of a weight each of whose blocks is code x scale + min exactly, codes 0..15, with (scale,
    min) = grid(blocks) ([..., 1] each) for its blocks [..., GGUF_BLOCK]; None otherwise."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % GGUF_BLOCK:
        return None
    blocks_per_row = weight.shape[1] // GGUF_BLOCK
    codes = torch.empty(weight.shape[0], blocks_per_row, GGUF_BLOCK // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(weight.shape[0], blocks_per_row, 2, dtype=torch.float32, device=weight.device)
    for start, rows in _row_chunks(weight):
        blocks = rows.unflatten(-1, (-1, GGUF_BLOCK))
        scale, low = grid(blocks)
        q = ((blocks - low) / scale.masked_fill(scale == 0, 1)).round().clamp_(0, 15)
        if not torch.equal(q * scale + low, blocks):
            return None
        q = q.to(torch.uint8)
        codes[start:start + len(rows)] = q[..., :16] | q[..., 16:] << 4
        scales[start:start + len(rows)] = torch.cat([scale, low], dim=-1)
    return codes, scales


def keep_gguf_tables(model: nn.Module, most_bits: int = 8) -> int:
    """Replace each fp32 CPU weight that is exactly a GGUF block tensor by its codes and scales: an embedding table
    (Q8_0: an Int8Embedding, and the output layer tied to it a GGUFLinear) and every other linear of at most
    `most_bits` bits (Q8_0, Q4_1 or Q4_0: a GGUFLinear; with 4, a Q8_0 linear stays for quantize_model's int4). The
    same weights in a quarter (Q8_0) or a seventh (Q4_1) of the memory, products 2.4x faster (the embedded model's
    output layer). Only where glm_core.native's kernels run: without them the fp32 weights are faster. Returns how
    many weights."""
    if native.library() is None:
        return 0
    kept = 0
    tables: list[tuple[Tensor, Int8Embedding]] = []   # (fp32 weight, its codes), for the linears tied to it
    for parent in list(model.modules()):
        for name, table in list(parent._modules.items()):
            if isinstance(table, nn.Embedding) and table.weight.device.type == "cpu":
                found = q8_0_tables(table.weight)
                if found is not None:
                    tables.append((table.weight, Int8Embedding(*found)))
                    setattr(parent, name, tables[-1][1])
                    kept += 1
    done: dict[int, nn.Module | None] = {}   # a linear used in two places becomes one module
    for parent in list(model.modules()):
        for name, linear in list(parent._modules.items()):
            if type(linear) is not nn.Linear or linear.weight.device.type != "cpu":
                continue
            if id(linear) not in done:
                tied = [compact for weight, compact in tables if linear.weight is weight]
                if tied:
                    done[id(linear)] = tied[0].as_linear(None)
                else:
                    found, kind = (q8_0_tables(linear.weight) if most_bits >= 8 else None), "q8_0"
                    for recover in (q4_1_tables, q4_0_tables):   # Q4_0 kept as Q4_1 tables
                        if found is None:
                            found, kind = recover(linear.weight), "q4_1"
                    done[id(linear)] = None if found is None else GGUFLinear(kind, *found, linear.bias)
                    kept += found is not None
            if done[id(linear)] is not None:
                setattr(parent, name, done[id(linear)])
    return kept


def _cpu_block_layout() -> tuple[int, bool]:
    """How _convert_weight_to_int4pack_for_cpu lays rows out: blocks of 64 rows (AVX512) or 32 (others), each
    stored as [in, rows/2] bytes. Full AVX512/AVX2 blocks put the first half of the rows in the low nibbles and
    the second half in the high ones (`half_split`); tail blocks and other builds pair rows 2j (low), 2j+1 (high)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return 64, True
    return 32, capability == "AVX2"


def _unpack_into(packed: Tensor, out: Tensor, rows: int, half_split: bool) -> None:
    """Blocks of [in, rows/2] bytes -> out [in, blocks * rows], the codes of those rows transposed (no copy back)."""
    in_features = out.shape[0]
    blocks = packed.view(-1, in_features, rows // 2).transpose(0, 1)  # [in, blocks, rows/2]
    if half_split:
        dst = out.view(in_features, -1, 2, rows // 2)
        low, high = dst[:, :, 0], dst[:, :, 1]
    else:
        dst = out.view(in_features, -1, rows // 2, 2)
        low, high = dst[..., 0], dst[..., 1]
    torch.bitwise_and(blocks, 15, out=low)
    torch.bitwise_right_shift(blocks, 4, out=high)


class Int4Linear(QuantizedLinear):
    """y = x @ W.T + bias with W[n, k] = (code - 8) * scale[g, n] + zero[g, n], g = k // group_size.

    `codes` [out, in] in 0..15 (any integer dtype) and `scales_and_zeros` [in / group_size, out, 2] are packed for
    the device they are on, in that device's kernel layout; the module then runs on that device type only. Unless
    `official`, where glm_core.native runs the product (AVX2: 2 rows or more, prompts and several visitors' decode
    steps; AMX CPUs: decode steps of 1 to 19 rows) it multiplies the input quantized to int8 per block of 32, as
    llama.cpp's Q4_0 x Q8_0 (official layers on AMX CPUs: to int16, below DENSE_MIN_ROWS rows)."""

    def __init__(self, codes: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None,
                 activation_dtype: torch.dtype | None = None, official: bool = False):
        super().__init__(bias, activation_dtype, official)
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.block_rows, self.half_split = _cpu_block_layout()
        if codes.device.type == "cuda":
            codes = codes.to(torch.uint8)
            pairs = codes[:, ::2] << 4 | codes[:, 1::2]  # CUDA wants even columns in the high nibble
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
            scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
        else:  # whole blocks of rows pack independently: a slice at a time keeps the int32 scratch small
            packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
            for start in range(0, self.out_features, QUANTIZE_ROWS):
                rows = codes[start:start + QUANTIZE_ROWS].to(torch.int32)
                packed[start:start + rows.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        # the dense path (prefill, fp32) reads the packed bytes back: check that read on the first and tail block
        full_end = self.out_features // self.block_rows * self.block_rows
        spans = [(0, min(self.block_rows, self.out_features)), (full_end, self.out_features)]
        self.unpackable = codes.device.type == "cpu" and all(
            torch.equal(self.unpack_codes(a, b), codes[a:b].to(torch.uint8)) for a, b in spans if b > a)

    def unpack_codes(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """uint8 codes [stop - start, in] of output rows start..stop from the CPU layout (start on a block edge);
        a transposed view of a contiguous [in, rows] tensor (in `out`'s memory when given), the order the dense
        path multiplies in."""
        k, flat = self.in_features, self.qweight.view(-1)
        full_end = min(stop, self.out_features // self.block_rows * self.block_rows)
        shape = (k, stop - start)
        out = torch.empty(shape, dtype=torch.uint8) if out is None else out[:k * (stop - start)].view(shape)
        if full_end > start:
            _unpack_into(flat[start * k // 2:full_end * k // 2], out[:, :full_end - start], self.block_rows, self.half_split)
        if stop > full_end:  # the tail block, always in row pairs
            _unpack_into(flat[full_end * k // 2:stop * k // 2], out[:, full_end - start:], stop - full_end, False)
        return out.t()

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None,
                   scratch: Scratch | None = None) -> Tensor:
        """W[start:stop] as a transposed view of a contiguous [in, rows] tensor (in scratch.weight when given)."""
        stop = self.out_features if stop is None else stop
        shape = (self.in_features, stop - start)
        if native.dequantizes_int4(self, dtype, stop):
            return native.int4_dequantize_bf16(self, start, stop, None if scratch is None else scratch.weight).t()
        codes = self.unpack_codes(start, stop, None if scratch is None else scratch.codes).t()
        q = codes.view(torch.int8).sub_(8)
        q = q.to(dtype) if scratch is None else scratch.weight[:q.numel()].view(shape).copy_(q)
        w = q.view(self.in_features // self.group_size, self.group_size, stop - start)
        # [groups, 1, rows] each, contiguous: a strided broadcast operand made addcmul 4x slower
        scales, zeros = (self.scales_and_zeros[:, start:stop, i, None].to(dtype).transpose(1, 2).contiguous()
                         for i in (0, 1))
        # zero + q * scale: a single rounding of q * scale when zero is 0, so the official format comes out exact
        return torch.addcmul(zeros, w, scales, out=w).view(shape).t()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != self.qweight.device.type:
            raise RuntimeError(f"Int4Linear was packed for {self.qweight.device.type} and got input on {x.device}: "
                               "its layout is device-specific, quantize again on the target device")
        return super().forward(x)

    def native_takes(self, x: Tensor) -> bool:
        return native.takes_int4(x, self)

    def amx_takes(self, x: Tensor) -> bool:
        return native.takes_int4_amx(x, self)

    def amx_product(self, x: Tensor) -> Tensor:
        return native.int4_matmul_amx(x, self)

    def fused(self, x: Tensor) -> Tensor:
        if x.device.type == "cuda":  # the CUDA kernel takes bf16 only
            return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.qweight, self.group_size,
                                                      self.scales_and_zeros.to(torch.bfloat16))
        if self.native_takes(x):
            return native.int4_matmul(x, self.qweight, self.scales_and_zeros, self.out_features, self.group_size,
                                      int8_activations=not self.official)
        if native.takes_int4_decode(x, self):
            return native.int4_decode(x, self)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size,
                                                          self.scales_and_zeros.to(x.dtype))


def int4_group_size(in_features: int, out_features: int, wanted: int, device: torch.device | str = "cpu") -> int | None:
    """The largest kernel group size <= `wanted` that divides `in_features`, or None when the int4 kernels cannot
    take the shape at all (in_features not a multiple of 32, out_features not a multiple of 16 on CPU / 8 on CUDA)."""
    if wanted not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {wanted}")
    row_multiple = 8 if torch.device(device).type == "cuda" else 16
    if out_features % row_multiple:
        return None
    return next((g for g in INT4_GROUP_SIZES if g <= wanted and in_features % g == 0), None)


def _nonzero(scales: Tensor) -> Tensor:
    return torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-constant row/group: any scale is exact


def _row_chunks(weight: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(first row, fp32 copy of QUANTIZE_ROWS rows) over a weight: ours to change in place, one chunk at a time."""
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        yield start, weight[start:start + QUANTIZE_ROWS].detach().to(torch.float32, copy=True)


def _quantize_int8(weight: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for start, w in _row_chunks(weight):
        s = _nonzero((torch.linalg.vector_norm(w, float("inf"), dim=1) / 127).to(scale_dtype))
        q[start:start + len(w)] = w.div_(s.float()[:, None]).round_().clamp_(-127, 127)  # with the scale as stored
        scales[start:start + len(w)] = s
    return q, scales


def _quantize_int4(weight: Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Asymmetric min/max per group (16 levels): clearly lower error than symmetric at the same group size."""
    out_features, in_features = weight.shape
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales_and_zeros = torch.empty(in_features // group_size, out_features, 2, dtype=scale_dtype, device=weight.device)
    for start, w in _row_chunks(weight):
        rows = slice(start, start + len(w))
        w = w.view(len(w), in_features // group_size, group_size)
        low, high = w.amin(dim=2), w.amax(dim=2)
        scales = _nonzero(((high - low) / 15).to(scale_dtype))
        zeros = (low + 8 * scales.float()).to(scale_dtype)  # the kernels dequantize (code - 8) * scale + zero
        # codes that fit the scale and zero as stored
        w.sub_(zeros.float()[..., None]).div_(scales.float()[..., None]).add_(8).round_().clamp_(0, 15)
        codes[rows] = w.view(len(w), in_features)
        scales_and_zeros[:, rows] = torch.stack([scales, zeros], dim=2).transpose(0, 1)
    return codes, scales_and_zeros


def quantize_linear(weight: Tensor, bias: Tensor | None, precision: str, group_size: int = 128,
                    activation_dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize a float weight [out, in] (any float dtype, on CPU or CUDA) to "int8" or "int4".

    int4 groups of `group_size` input columns; when that does not divide in_features the largest smaller kernel
    group size that does is used, and a layer the int4 kernels cannot take at all (see int4_group_size) stays int8.
    The module keeps only the quantized tensors, its scales (in activation_dtype, else weight's dtype; bf16 for
    int4 on CUDA) and the bias. Rows are quantized a chunk at a time: the float scratch stays small."""
    scale_dtype = activation_dtype or weight.dtype
    if precision == "int8":
        return Int8Linear(*_quantize_int8(weight, scale_dtype), bias, activation_dtype)
    if precision != "int4":
        raise ValueError(f"precision must be 'int8' or 'int4', got {precision!r}")
    out_features, in_features = weight.shape
    group = int4_group_size(in_features, out_features, group_size, weight.device)
    if group is None:
        return Int8Linear(*_quantize_int8(weight, scale_dtype), bias, activation_dtype)
    if weight.device.type == "cuda":
        scale_dtype = torch.bfloat16  # what the CUDA kernel takes
    return Int4Linear(*_quantize_int4(weight, group, scale_dtype), group, bias, activation_dtype)


def unpack_official_int4(qweight: Tensor) -> Tensor:
    """Official packed int4 [out, in/2] (high nibble first, sign-extended) -> int8 values [out, in]."""
    packed = qweight.to(torch.int8)
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=2).view(qweight.shape[0], -1)


def from_official(qweight: Tensor, weight_scale: Tensor, bits: int, bias: Tensor | None,
                  activation_dtype: torch.dtype | None = None) -> nn.Module:
    """An official ChatGLM quantized linear: int8 [out, in] or packed int4 [out, in/2] with one scale per row.

    int8 keeps the tensors as they are. int4 becomes torch's group format with the row scale repeated over
    groups of the largest size dividing in_features and zero 0, so dequantized weights equal float(scale) * q
    exactly; a shape the int4 kernels cannot take becomes Int8Linear of the same values (exact, twice the bytes).
    Scales stay in weight_scale's dtype: give them in the activation dtype for the fused kernels."""
    if bits == 8:
        return Int8Linear(qweight, weight_scale, bias, activation_dtype, official=True)
    if bits != 4:
        raise ValueError(f"official ChatGLM checkpoints are 4 or 8 bit, got {bits}")
    q = unpack_official_int4(qweight)
    out_features, in_features = q.shape
    group = int4_group_size(in_features, out_features, INT4_GROUP_SIZES[0], q.device)
    if group is None:
        return Int8Linear(q, weight_scale, bias, activation_dtype, official=True)
    scales = weight_scale[None, :, None].expand(in_features // group, out_features, 1)
    scales_and_zeros = torch.cat([scales, torch.zeros_like(scales)], dim=2)
    return Int4Linear(q.add(8).to(torch.uint8), scales_and_zeros, group, bias, activation_dtype, official=True)


def activation_dtype_for(device: torch.device | str) -> torch.dtype | None:
    """The activation dtype of layers quantized here: bf16 on CPU (see the module docstring), else the input's."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else None


def quantize_model(model: nn.Module, precision: str, group_size: int = 128,
                   skip: Callable[[str], bool] | None = None, exact: bool = False) -> nn.Module:
    """Replace every nn.Linear below `model` in place by its quantized module, except those `skip(dotted_name)`
    keeps and those whose weight is an nn.Embedding's weight (tied: quantizing would add bytes, not save them).
    The layers take the activation dtype of the device they are on (activation_dtype_for), or with `exact` their
    inputs as they come. GGUF layers kept as stored (keep_gguf_tables) are quantized already: they take that dtype
    for prompts (decode steps stay fp32 on their kernel)."""
    tied = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    done: dict[int, nn.Module] = {}  # a Linear used in two places stays one module
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):  # every name, also a second one for the same module
            full_name = f"{parent_name}.{name}" if parent_name else name
            if skip and skip(full_name):
                continue
            if isinstance(child, GGUFLinear) and not exact:
                child.prompt_dtype = activation_dtype_for(child.qweight.device) or torch.float32
            if not isinstance(child, nn.Linear) or any(child.weight is t for t in tied):
                continue
            if id(child) not in done:
                activation = None if exact else activation_dtype_for(child.weight.device)
                done[id(child)] = quantize_linear(child.weight, child.bias, precision, group_size, activation)
            setattr(parent, name, done[id(child)])
    return model
