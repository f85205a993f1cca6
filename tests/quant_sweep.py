"""Child process of tests/test_quant.py's shape sweep: one case per line of JSON on stdin, one line out per case.

Each case builds a quantized layer the way GLM Studio does (quantize_linear or from_official), multiplies `rows`
inputs through it and checks the result against x @ dequantize().T in float64 within error_bound. Run as a child
so that a kernel that crashes the process is a failed case (the parent sees which case was started last) and not
a dead test suite. Prints "start <id>" before a case and "<id> ok|wrong|error <detail>" after it.
"""
import json
import sys

import torch

from glm_core import native, quant

KERNEL_K_MULTIPLE = quant.INT8_KERNEL_K_MULTIPLE
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def error_bound(x: torch.Tensor, w: torch.Tensor, rounding: torch.dtype) -> torch.Tensor:
    """Worst-case |computed - exact| of x @ w.T when the weights and the output may each be rounded to `rounding`
    once and the K products are summed in fp32 (the CPU kernels and GEMMs accumulate in fp32):
    u*|y| (output) + u*sum|x||w| (weights) + K*2^-24*sum|x||w| (accumulation), with a factor 1.01 for the
    second-order terms. The input rounding is not in it: the reference takes the rounded input."""
    u, k = UNIT_ROUNDOFF[rounding], x.shape[1]
    magnitude = x.abs() @ w.abs().t()
    return 1.01 * (u * (x @ w.t()).abs() + (u + k * 2.0 ** -24) * magnitude) + 1e-30


def quantized_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """What native's int4 products of integer activations multiply instead of x [rows, in] (in a multiple of 32), in
    float64: each block of 32 columns rounded to nearest even, in fp32 arithmetic, on the block's scale: int8 max|x| /
    127; int16 the power of two that puts max|x| in [2^14, 2^15)."""
    blocks = x.float().unflatten(-1, (-1, 32))
    top = blocks.abs().amax(-1, keepdim=True)
    if bits == 8:
        inverse = torch.where(top > 0, torch.full_like(top, 127) / top, 0)   # 127 / top is 127 * (1 / top) in torch
        scale = top / torch.full_like(top, 127)
    else:   # top = mantissa x 2^exponent, mantissa in [0.5, 1)
        exponent = torch.frexp(top).exponent.float()
        inverse, scale = torch.exp2(15 - exponent), torch.exp2(exponent - 15)
    return ((blocks * inverse).round().double() * scale.double()).flatten(-2)


def activation_bits(module: torch.nn.Module, x: torch.Tensor) -> int | None:
    """The integer width module(x) quantizes x to in native's int4 products (quantized_activations), or None where
    its product takes x as it is: AVX2's from 2 rows (int8, not in official checkpoints' layers), AMX CPUs' decode
    kernel (int8, official layers int16)."""
    if not (isinstance(module, quant.Int4Linear) and module.activation_dtype == torch.bfloat16):
        return None
    x = x.to(torch.bfloat16)
    if not module.official and x.shape[0] >= native.INT4_INT8_ACTIVATIONS_MIN_ROWS and module.native_takes(x):
        return 8
    if native.takes_int4_decode(x, module):
        return 16 if module.official else 8
    return None


def layer(case: dict, generator: torch.Generator) -> torch.nn.Module:
    n, k, activation = case["out"], case["in"], getattr(torch, case["activation"]) if case["activation"] else None
    if case["official"]:   # an official ChatGLM layer: int8 [out, in] or int4 packed [out, in/2], fp16 scales
        bits = int(case["precision"][-1])
        q = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (n, k), generator=generator, dtype=torch.int8)
        stored = q if bits == 8 else ((q[:, ::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
        scales = (torch.rand(n, generator=generator) / 50 + 1e-3).half().to(activation or torch.float32)
        return quant.from_official(stored, scales, bits, None, activation)
    w = torch.randn(n, k, generator=generator) / k ** 0.5
    bias = torch.randn(n, generator=generator)
    return quant.quantize_linear(w, bias, case["precision"], case.get("group", 128), activation_dtype=activation)


def run(case: dict) -> str:
    quant.INT8_KERNEL_K_MULTIPLE = case.get("int8_kernel_k_multiple", KERNEL_K_MULTIPLE)   # 1: unpadded, to show the sweep sees it
    g = torch.Generator().manual_seed(case["id"])
    module = layer(case, g)
    x = torch.randn(case["rows"], case["in"], generator=g)
    rounding = torch.float32
    if module.activation_dtype is not None:
        x, rounding = x.to(module.activation_dtype).float(), module.activation_dtype
    y = module(x).double()
    w = module.dequantize().double()
    bias = 0 if module.bias is None else module.bias.double()
    x64 = x.double()
    bits = activation_bits(module, x)
    if bits:
        x64 = quantized_activations(x, bits)
    ref = x64 @ w.t() + bias
    bound = error_bound(x64, w, rounding) + 2.0 ** -24 * (ref.abs() + abs(bias))   # + bias in fp32
    over = ((y - ref).abs() - bound).max()
    kind = type(module).__name__
    if not torch.isfinite(y).all():
        return f"wrong {kind} non-finite output"
    if over > 0:
        return f"wrong {kind} error beyond the bound by {float(over):.3g} (|y| max {float(ref.abs().max()):.3g})"
    return f"ok {kind}"


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print("capability", torch.backends.cpu.get_cpu_capability(), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        print("start", case["id"], flush=True)
        try:
            print(case["id"], run(case), flush=True)
        except Exception as e:  # noqa: BLE001 - a refused shape is a result too
            print(case["id"], "error", repr(e).replace("\n", " ")[:300], flush=True)
