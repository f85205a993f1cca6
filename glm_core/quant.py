"""Weight-only INT8 / INT4 linear layers on torch's own kernels.

INT8: symmetric per output channel (`scale = max|w| / 127`), product by `aten._weight_int8pack_mm`.
INT4: torch's group-wise format (codes 0..15, `w = (code - 8) * scale + zero` per group of input columns),
product by `aten._weight_int4pack_mm_for_cpu` (CPU) or `aten._weight_int4pack_mm` (CUDA, bf16 only).
The official ChatGLM INT4 format (per-channel symmetric, values -7..7) is the special case zero = 0 with
the channel scale repeated over every group, so its dequantized weights are exactly `float(scale) * q`.

Which product runs:
- fp32 activations: dequantize to fp32 and `x.mm(w.t())`, the official CPU arithmetic op for op.
- CPU, bf16/fp16, fewer than DENSE_MIN_ROWS rows (decode): the fused kernel.
- CPU, more rows (prefill): dequantize DENSE_CHUNK_ELEMENTS weights at a time to fp32 and use the fp32 GEMM,
  which on CPUs without native bf16 is faster than both the fused kernels and a bf16 GEMM (measured 1.7x / 5x
  at 512 rows on a 2-core AVX2 EPYC).
- CUDA: int4 runs the bf16 tinygemm kernel; int8 dequantizes and matmuls in the activation dtype, because the
  CUDA `_weight_int8pack_mm` (torch 2.11, H100) was 9x slower than that for one row and 600x for 512.

Scales, zeros and bias are float tensors that follow `module.to(dtype)` like parameters; they start in the
dtype of the weight given. Keep them in the compute dtype (`model.to(dtype)`): otherwise every call casts them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

INT4_GROUP_SIZES = (256, 128, 64, 32)  # the group sizes the int4 kernels accept, largest first
DENSE_MIN_ROWS = 128                    # CPU: from this many rows on, dequantize + fp32 GEMM beats the fused kernels
DENSE_CHUNK_ELEMENTS = 4 << 20          # weights dequantized at a time (16 MB in fp32): bounded scratch, in cache


def _as_bias(bias: Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)


def _dense_matmul(x: Tensor, module: nn.Module) -> Tensor:
    """x [M, in] @ W.T with W dequantized. fp32 runs as one product on W [out, in], the official CPU code op for op;
    accelerators run one product in the activation dtype; CPU computes in fp32 (a fast GEMM on every CPU, unlike
    bf16 without native support), a chunk of output rows at a time so the scratch weight stays small and in cache."""
    if x.dtype == torch.float32:
        return x.mm(module.dequantize(torch.float32).contiguous().t())
    if x.device.type != "cpu":
        return x.mm(module.dequantize(x.dtype).t())
    xf = x.float()
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    rows = max(64, DENSE_CHUNK_ELEMENTS // module.in_features // 64 * 64)  # on int4 block edges (32 or 64 rows)
    for start in range(0, module.out_features, rows):
        stop = min(start + rows, module.out_features)
        out[:, start:stop] = xf.mm(module.dequantize(torch.float32, start, stop).t())
    return out.to(x.dtype)


class Int8Linear(nn.Module):
    """y = x @ (scale * q).T + bias with q int8 [out, in] and one scale per output row."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.bias = _as_bias(bias)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> Tensor:
        rows = slice(start, self.out_features if stop is None else stop)
        return self.qweight[rows] * self.scales[rows, None].to(dtype)  # one pass: int8 * float promotes to float

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype != torch.float32 and x2.shape[0] < DENSE_MIN_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales.to(x.dtype))
        else:
            y = _dense_matmul(x2, self)
        if self.bias is not None:
            y = y + self.bias  # after the product, as the official code adds it
        return y.reshape(*x.shape[:-1], self.out_features)


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


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W[n, k] = (code - 8) * scale[g, n] + zero[g, n], g = k // group_size.

    `codes` int [out, in] in 0..15 and `scales_and_zeros` [in / group_size, out, 2] are packed for the device
    they are on, in that device's kernel layout; the module then runs on that device type only."""

    def __init__(self, codes: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.block_rows, self.half_split = _cpu_block_layout()
        if codes.device.type == "cuda":
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # CUDA wants even columns in the high nibble
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
            scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.bias = _as_bias(bias)
        # the dense path (prefill, fp32) reads the packed bytes back: check that read on the first and tail block
        full_end = self.out_features // self.block_rows * self.block_rows
        spans = [(0, min(self.block_rows, self.out_features)), (full_end, self.out_features)]
        self.unpackable = codes.device.type == "cpu" and all(
            torch.equal(self.unpack_codes(a, b), codes[a:b].to(torch.uint8)) for a, b in spans if b > a)

    def unpack_codes(self, start: int, stop: int) -> Tensor:
        """uint8 codes [stop - start, in] of output rows start..stop from the CPU layout (start on a block edge);
        a transposed view of a contiguous [in, rows] tensor, the order the dense path multiplies in."""
        k, flat = self.in_features, self.qweight.view(-1)
        full_end = min(stop, self.out_features // self.block_rows * self.block_rows)
        out = torch.empty(k, stop - start, dtype=torch.uint8)
        if full_end > start:
            _unpack_into(flat[start * k // 2:full_end * k // 2], out[:, :full_end - start], self.block_rows, self.half_split)
        if stop > full_end:  # the tail block, always in row pairs
            _unpack_into(flat[full_end * k // 2:stop * k // 2], out[:, full_end - start:], stop - full_end, False)
        return out.t()

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> Tensor:
        """W[start:stop] as a transposed view of a contiguous [in, rows] tensor."""
        stop = self.out_features if stop is None else stop
        q = self.unpack_codes(start, stop).t().view(torch.int8).sub_(8).to(dtype)
        w = q.view(self.in_features // self.group_size, self.group_size, stop - start)
        sz = self.scales_and_zeros[:, start:stop, None].to(dtype).transpose(1, 3)  # [groups, 2, 1, rows]
        # zero + q * scale: a single rounding of q * scale when zero is 0, so the official format comes out exact
        return torch.addcmul(sz[:, 1], w, sz[:, 0], out=w).view(self.in_features, stop - start).t()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != self.qweight.device.type:
            raise RuntimeError(f"Int4Linear was packed for {self.qweight.device.type} and got input on {x.device}: "
                               "its layout is device-specific, quantize again on the target device")
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cuda":  # the CUDA kernel takes bf16 only
            y = torch.ops.aten._weight_int4pack_mm(
                x2.to(torch.bfloat16).contiguous(), self.qweight, self.group_size,
                self.scales_and_zeros.to(torch.bfloat16)).to(x.dtype)
        elif self.unpackable and (x.dtype == torch.float32 or x2.shape[0] >= DENSE_MIN_ROWS):
            y = _dense_matmul(x2, self)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


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


def _float_copy(weight: Tensor) -> Tensor:
    return weight.detach().to(torch.float32, copy=True)  # ours to change in place: one scratch copy, not several


def _quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    w = _float_copy(weight)
    scales = _nonzero((torch.linalg.vector_norm(w, float("inf"), dim=1) / 127).to(weight.dtype))
    q = w.div_(scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # with the scale as stored
    return q, scales


def _quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric min/max per group (16 levels): clearly lower error than symmetric at the same group size."""
    out_features, in_features = weight.shape
    dtype = torch.bfloat16 if weight.device.type == "cuda" else weight.dtype  # what Int4Linear will store
    w = _float_copy(weight).view(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scales = _nonzero(((high - low) / 15).to(dtype))
    zeros = (low + 8 * scales.float()).to(dtype)  # the kernels dequantize (code - 8) * scale + zero
    # codes that fit the scale and zero as stored
    codes = w.sub_(zeros.float()[..., None]).div_(scales.float()[..., None]).add_(8).round_().clamp_(0, 15)
    scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1)
    return codes.to(torch.int32).view(out_features, in_features), scales_and_zeros


def quantize_linear(weight: Tensor, bias: Tensor | None, precision: str, group_size: int = 128) -> nn.Module:
    """Quantize a float weight [out, in] (any float dtype, on CPU or CUDA) to "int8" or "int4".

    int4 groups of `group_size` input columns; when that does not divide in_features the largest smaller kernel
    group size that does is used, and a layer the int4 kernels cannot take at all (see int4_group_size) stays int8.
    The module keeps only the quantized tensors, its scales (in weight's dtype) and the bias."""
    if precision == "int8":
        return Int8Linear(*_quantize_int8(weight), bias)
    if precision != "int4":
        raise ValueError(f"precision must be 'int8' or 'int4', got {precision!r}")
    out_features, in_features = weight.shape
    group = int4_group_size(in_features, out_features, group_size, weight.device)
    if group is None:
        return Int8Linear(*_quantize_int8(weight), bias)
    return Int4Linear(*_quantize_int4(weight, group), group, bias)


def unpack_official_int4(qweight: Tensor) -> Tensor:
    """Official packed int4 [out, in/2] (high nibble first, sign-extended) -> int8 values [out, in]."""
    packed = qweight.to(torch.int8)
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=2).view(qweight.shape[0], -1)


def from_official(qweight: Tensor, weight_scale: Tensor, bits: int, bias: Tensor | None) -> nn.Module:
    """An official ChatGLM quantized linear: int8 [out, in] or packed int4 [out, in/2] with one scale per row.

    int8 keeps the tensors as they are. int4 becomes torch's group format with the row scale repeated over
    groups of the largest size dividing in_features and zero 0, so dequantized weights equal float(scale) * q
    exactly; a shape the int4 kernels cannot take becomes Int8Linear of the same values (exact, twice the bytes)."""
    if bits == 8:
        return Int8Linear(qweight, weight_scale, bias)
    if bits != 4:
        raise ValueError(f"official ChatGLM checkpoints are 4 or 8 bit, got {bits}")
    q = unpack_official_int4(qweight)
    out_features, in_features = q.shape
    group = int4_group_size(in_features, out_features, INT4_GROUP_SIZES[0], q.device)
    if group is None:
        return Int8Linear(q, weight_scale, bias)
    scales = weight_scale[None, :, None].expand(in_features // group, out_features, 1)
    scales_and_zeros = torch.cat([scales, torch.zeros_like(scales)], dim=2)
    return Int4Linear(q.to(torch.int32).add_(8), scales_and_zeros, group, bias)


def quantize_model(model: nn.Module, precision: str, group_size: int = 128,
                   skip: Callable[[str], bool] | None = None) -> nn.Module:
    """Replace every nn.Linear below `model` in place by its quantized module, except those `skip(dotted_name)`
    keeps and those whose weight is an nn.Embedding's weight (tied: quantizing would add bytes, not save them)."""
    tied = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    done: dict[int, nn.Module] = {}  # a Linear used in two places stays one module
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):  # every name, also a second one for the same module
            full_name = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear) or any(child.weight is t for t in tied) or (skip and skip(full_name)):
                continue
            if id(child) not in done:
                done[id(child)] = quantize_linear(child.weight, child.bias, precision, group_size)
            setattr(parent, name, done[id(child)])
    return model
