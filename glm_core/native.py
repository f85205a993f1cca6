"""Products for AVX2 CPUs, hand-written (kernels/matmul_avx2.c) where torch's kernels leave memory bandwidth or
arithmetic unused. Decode (a row or a few): on a 2-core AVX2 Zen 2, one row against a 27392 x 4096 weight, bf16 ran
6.7 ms (33 GB/s) against torch's 16.9 ms (13 GB/s), int4 in torch's packed layout 3.5-4.4 ms against 7.7. More rows
(prefill, batched decode): each block of 32 output columns is decoded a tile at a time that stays in L1 while every
row multiplies it, in fp32: 512 rows against the same weight, int4 0.63 s against 0.89 for dequantizing into a fp32
GEMM (oneDNN), bf16 0.66 against 0.86. In the int4 layers GLM Studio quantizes itself (not an official checkpoint's:
quant.QuantizedLinear.official), tiles stay codes and multiply the activations quantized to int8 per block of 32
(llama.cpp's Q8_0 arithmetic) with vpmaddubsw, twice the FMA rate: 512 rows 0.43 s, 8 rows 10 ms against 18.
BENCHMARKS.md has the figures.

GGUF block tensors kept as stored (quant.GGUFLinear: Q8_0 and Q4_1, the embedded model's tables and layers in fp32)
multiply fp32 activations here on every CPU with AVX2, in 512-bit vectors where torch runs its AVX-512 path: one row
against the embedded model's 49152 x 576 Q8_0 output layer 1.8 ms streamed from memory on a 2-core AMX Xeon, against
4.3 for the same weights in fp32; its 120 Q4_1 layer products 10.3 ms a token before their totals were kept in
registers, 6.8 after, 6.1 in 512 bits.

Decode steps' attention (one new row per sequence, fp32 caches) runs here too, every sequence of a step in one call
that also stores the new keys and values (decode_attention): on a 2-core AMX Xeon, 2000 cached positions of the
embedded model, 212-269 us a layer against 267-350 for torch's flash attention, which splits one row over its 3 key
groups only. So does RMSNorm's scaling of fp32 rows (rms_norm_scale: torch's rounding, in one call for five ops).

The layers of a Llama-family model whose products are all GGUF block tensors (the embedded model in fp32, its
default) run a decode step in one call (llama_decode_layers, used by model_llama.Llama.layers): the Python and torch calls
between its products had taken as long as the products, and a step went from 12.3 to 5.1-6.1 ms (BENCHMARKS.md).

Where torch takes its AVX-512 path and the CPU has AVX-512 bf16, bf16 decode rows run bf16_decode: vdpbf16ps over
eight weight rows at once, each prefetched. On a 2-core AMX Xeon, one row against weights streamed from memory, 27392 x
4096 7.6 ms against 8.4 for oneDNN's packed product, 4096 x 13696 3.2 against 4.6 (29-34 GB/s against 24-26): the 6B
model's bf16 decode 2.24-2.38 tok/s against 1.81-1.98 (BENCHMARKS.md). Those weights stay plain, and on CPUs with AMX
5 to AMX_MAX_ROWS_BF16 rows (short prompts, several visitors decoding) run the AMX product below on them.

Elsewhere on that path torch's kernels run the products (they are not the bottleneck there), but a prompt's
int4 and int8 products dequantize the weight a chunk at a time into bf16 for oneDNN's GEMM, and that runs here on
every CPU with AVX2 (int4_dequantize_bf16, int8_dequantize_bf16): one pass where torch's elementwise ops take up to
four. On a 2-core AMX Xeon, whose bf16 GEMM runs 512 rows against a 27392 x 4096 weight in 54 ms, int4 dequantizes
it in 13 ms against 59 and int8 in 14 against 28: the whole product 69 ms against 122 (int4), 65 against 83 (int8).

On CPUs with AMX (and torch on its AVX-512 path) int4 and int8 products of AMX_MIN_ROWS_INT4 / AMX_MIN_ROWS_INT8 to
AMX_MAX_ROWS rows run kernels/matmul_amx.c: 32 output columns at a time are dequantized a chunk of inner indices at
a time into L1 and multiplied there by AMX's bf16 tile product, so neither a dequantized copy of the weight nor the
GEMM's read of it goes through memory. On a 2-core AMX Xeon, 32 rows against a 27392 x 4096 weight: int4 9.0 ms
against 28.2 for dequantizing into a GEMM, int8 7.6 against 26.6 (a bf16 GEMM on bf16 weights: 11.1; bf16 weights
copied a chunk at a time by the same kernel: 10.6, and 15.4 against 17.0 at 64 rows). There, fewer
int4 rows (decode; an official checkpoint's layers below the dense path) run int4_decode: the activations quantized
per block of 32 and multiplied in exact integer sums, the codes prefetched into L2 (a plain read of the weights reads
27 GB/s, int4_decode with fp32 arithmetic read 17-18). In the layers GLM Studio quantizes, to int8 as the AVX2 product
does, with vpdpbusd (64 byte products an instruction): one row 2.4 ms streamed from memory against 3.3 for the fp32
kernel (24 such weights in turn, past the 480 MB L3), 8 rows 4.2 against the AMX product's 8.9. In official
checkpoints' layers, to int16 with power-of-two scales (exact for every value within 2^7 of its block's largest,
which bf16's 8 significant bits make most of them), with vpdpwssd: one row 2.8-3.0 ms, 2x torch's kernel from 8 to
127 rows.

The C files are compiled on first use with the system's C compiler into the cache (keyed by the source's hash) and
loaded with ctypes; it uses OpenMP from the process's libgomp, which is torch's, so torch's thread count (and
threads.ThreadPolicy) applies to it. Without a compiler, or with GLM_STUDIO_NATIVE_KERNELS=0, torch's kernels and
elementwise dequantization run.

Arithmetic: bf16 activations widened exactly to fp32, fp32 products and sums, fp32 outputs (torch's bf16 kernels
round theirs to bf16). int4 with int8 or int16 activations (AVX2 from 2 rows, int8; AMX CPUs below
amx_min_rows_int4): quantized as tests/quant_sweep.py's quantized_activations does, exact integer sums per block of
32, then fp32; a row's product is the same alone or in a batch (AVX2: of 2 or more)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from .registry import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "matmul_avx2.c"
# loops aligned to 64 bytes: the int4 decode kernel ran 5-10 % slower or faster as unrelated code moved it
FLAGS = ["-O3", "-mavx2", "-mfma", "-falign-loops=64", "-fopenmp", "-shared", "-fPIC"]
AMX_SOURCE = Path(__file__).parent / "kernels" / "matmul_amx.c"
AMX_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mavx512vbmi",
             "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared", "-fPIC"]
# Row counts where each kernel takes over, measured on a 2-core Zen 2 against a 27392 x 4096 weight (ms):
# int4: decode kernel 4 rows 8.9, 5 rows 14.2; tiled 11.1 and 11.3
INT4_TILED_MIN_ROWS = 5
# int4 with int8 activations: 1 row 4.2-4.3 against the decode kernel's 3.5-4.1, 2 rows 5.0 against 5.7
INT4_INT8_ACTIVATIONS_MIN_ROWS = 2
# int8: 1 row 5.2 against torch's 6.5 (2 rows: 8.2 against 7.5, torch's stays); tiled 8 rows 25.3 against torch's
# 21.7, 10 rows 25.7 against 32.4 (torch's steps up past 8), 128 rows 162 against 269 for the dequantized GEMM
INT8_MAX_ROWS = 1
INT8_TILED_MIN_ROWS = 9
# bf16: decode kernel 16 rows 31.4 against the tiled 36.9, 24 rows 45.2 against 44.0, 32 rows 59.8 against 55.9
BF16_TILED_MIN_ROWS = 24
BF16_DECODE_MAX_ROWS = 4   # bf16_decode's rows (kernels/matmul_avx2.c's)
# AMX against what runs below and the dequantize-then-GEMM path above, on a 2-core AMX Xeon, 27392 x 4096 and
# 4096 x 13696 weights (ms). int8 against torch's kernel: 3 rows 4.9 / 2.3 against 4.8 / 2.2, 4 rows 5.2 / 2.4
# against 5.8 / 2.6. 256 rows int4 34.7 / 24.1 against 51.6 / 26.2, 320 rows 57.6 / 29.0 against 57.8 / 28.6 (x no
# longer fits in L2), int8 alike. int4 below AMX_MIN_ROWS_INT4 runs int4_decode, with int8 activations, against the
# AMX product, streamed from memory (24 weights in turn): 16 rows 7.3 / 3.8 against 9.0 / 4.3, 20 rows 9.3 against
# 10.0, 24 rows 10.3 / 5.3 against 10.0 / 4.7. Official checkpoints' layers take AMX only where they take the dense
# path (quant.DENSE_MIN_ROWS); below, int4_decode with int16 activations: 2x torch's kernel from 8 to 127 rows (8 rows
# 6.6 / 3.5 against 12.3 / 6.2, 127 rows 92 against 191 on the first), 1.6x at one row (2.8 / 1.5 against 4.5 / 2.4).
AMX_MIN_ROWS_INT4 = 20
AMX_MIN_ROWS_INT4_OFFICIAL = 128
AMX_MIN_ROWS_INT8 = 4
AMX_MAX_ROWS = 256
# bf16 (plain weights, NativeBf16Linear's): AMX from BF16_DECODE_MAX_ROWS + 1 rows to 64; oneDNN's product on the
# plain weight beyond. 2-core AMX Xeon, ms, AMX against oneDNN at 8 / 32 / 64 / 128 rows: 27392 x 4096 9.6 / 10.6 /
# 15.1 / 22.3 against 10.2 / 11.6 / 17.0 / 26.1, 4096 x 13696 4.6 / 5.3 / 9.3 / 15.4 against 5.2 / 6.3 / 9.9 / 12.1.
AMX_MAX_ROWS_BF16 = 64
AMX_MAX_ROWS_GGUF = 256   # GGUF block tensors read in bf16 (kept at int8 / int4), from GGUF_MAX_ROWS + 1 rows
# GGUF block tensors (fp32 activations): gguf_matmul (512-bit loop) against chunks dequantized into an fp32 GEMM,
# 16 / 24 / 32 / 48 rows on a 2-core AMX Xeon (ms): Q4_1 3072 x 576 0.42 / 0.66 / 0.85 / 1.31 against 0.62 / 0.75 /
# 0.84 / 0.96, Q8_0 49152 x 576 5.8 / 9.1 / 12.6 / 18.5 against 13.9 / 14.5 / 13.8 / 16.1. The crossover is past 24
# rows there; the 256-bit loop (AVX2 CPUs) does twice the instructions a weight, so it stays at 16.
GGUF_MAX_ROWS = 16
_build_lock = threading.Lock()


def wanted() -> bool:
    """Whether this process should build the kernels: the CPU has AVX2 (torch's cpuinfo), not turned off."""
    return os.environ.get("GLM_STUDIO_NATIVE_KERNELS", "1").strip() != "0" and torch.cpu._is_avx2_supported()


def runs_products() -> bool:
    """Whether the products run here: torch on its AVX2 path (also an AVX-512 CPU held there with
    ATEN_CPU_CAPABILITY=avx2, whose int4 layout is then AVX2's). Elsewhere only int4_dequantize_bf16 does."""
    return wanted() and torch.backends.cpu.get_cpu_capability() == "AVX2"


def compiler_path() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc or gcc on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(target_dir: Path, source_path: Path = SOURCE, flags: list[str] = FLAGS) -> Path:
    """Compile a kernel file into target_dir (once per source version and flags); raises RuntimeError with the
    compiler's message when that fails."""
    source = source_path.read_bytes()
    digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    target = target_dir / f"{source_path.stem}-{digest}.so"
    if target.exists():
        return target
    compiler = compiler_path()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:   # renamed into place whole: no half-written library
        built = Path(tmp) / target.name
        try:
            done = subprocess.run([compiler, *flags, str(source_path), "-o", str(built)], capture_output=True,
                                  text=True)
        except OSError as e:
            raise RuntimeError(f"{compiler} could not run: {e}") from e
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def _compiled(source_path: Path, flags: list[str], what: str) -> ctypes.CDLL | None:
    """The compiled kernel file, or None when it cannot be built (logged: torch's kernels run instead)."""
    try:
        with _build_lock:
            return ctypes.CDLL(str(build(cache_root() / "native", source_path, flags)))
    except (OSError, RuntimeError) as e:
        log.warning("%s unavailable, torch's kernels run instead: %s", what, e)
        return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled AVX2 kernels, or None where they are not wanted or cannot be built (logged once)."""
    if not wanted():
        return None
    lib = _compiled(SOURCE, FLAGS, "AVX2 products")
    if lib is None:
        return None
    pointer = ctypes.c_void_p
    lib.int4_matmul.argtypes = [pointer, pointer, pointer, pointer] + [ctypes.c_int] * 4
    lib.bf16_matmul.argtypes = [pointer, pointer, pointer] + [ctypes.c_int] * 3
    lib.int8_matmul.argtypes = [pointer, pointer, pointer, pointer] + [ctypes.c_int] * 4
    lib.int4_matmul_tiled.argtypes = lib.int4_matmul.argtypes
    lib.int4_matmul_int8_activations.argtypes = lib.int4_matmul.argtypes
    lib.bf16_matmul_tiled.argtypes = lib.bf16_matmul.argtypes
    lib.bf16_decode.argtypes = lib.bf16_matmul.argtypes
    lib.int8_matmul_tiled.argtypes = lib.int8_matmul.argtypes
    lib.int4_dequantize_bf16.argtypes = [pointer, pointer, pointer] + [ctypes.c_int] * 6
    lib.int8_dequantize_bf16.argtypes = [pointer, pointer, pointer] + [ctypes.c_int] * 4
    lib.gguf_matmul.argtypes = [ctypes.c_int] + [pointer] * 4 + [ctypes.c_int] * 4
    lib.gguf_dequantize.argtypes = [ctypes.c_int] + [pointer] * 3 + [ctypes.c_int] * 4
    lib.decode_attention.argtypes = [pointer] * 6 + [ctypes.c_int] * 4 + [ctypes.c_float, pointer]
    lib.rms_norm_scale.argtypes = [pointer] * 4 + [ctypes.c_int] * 2 + [ctypes.c_float]
    lib.llama_decode_layers.argtypes = ([pointer, pointer, ctypes.c_int] + [pointer] * 3 + [ctypes.c_int] * 6
                                        + [ctypes.c_float, ctypes.c_int])
    return lib


def amx_wanted() -> bool:
    """Whether this process should use the AMX products: the CPU has AMX, torch runs its AVX-512 path (held below it,
    with ATEN_CPU_CAPABILITY, the process stands for a CPU without AMX), not turned off."""
    return (os.environ.get("GLM_STUDIO_NATIVE_KERNELS", "1").strip() != "0" and torch.cpu._is_amx_tile_supported()
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


@functools.cache
def amx_library() -> ctypes.CDLL | None:
    """The compiled AMX kernels with the tile state granted to this process, or None (logged once)."""
    if not amx_wanted():
        return None
    lib = _compiled(AMX_SOURCE, AMX_FLAGS, "AMX products")
    if lib is None:
        return None
    if lib.amx_init() != 0:
        log.warning("AMX products unavailable, torch's kernels run instead: Linux refused this process the AMX "
                    "tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
        return None
    pointer = ctypes.c_void_p
    lib.int4_matmul_amx.argtypes = [pointer, ctypes.c_int, pointer, pointer, pointer] + [ctypes.c_int] * 3
    lib.int8_matmul_amx.argtypes = [pointer, ctypes.c_int, pointer, pointer, pointer] + [ctypes.c_int] * 3
    lib.bf16_matmul_amx.argtypes = [pointer, ctypes.c_int, pointer, pointer] + [ctypes.c_int] * 2
    lib.gguf_matmul_amx.argtypes = [ctypes.c_int, pointer, ctypes.c_int] + [pointer] * 3 + [ctypes.c_int] * 2
    lib.int4_decode_int8_activations.argtypes = [pointer] * 4 + [ctypes.c_int] * 4
    lib.int4_decode_int16_activations.argtypes = lib.int4_decode_int8_activations.argtypes
    return lib


def _checked(rc: int, out: Tensor) -> Tensor:
    if rc != 0:
        raise MemoryError("the native product could not allocate its scratch")
    return out


def int4_matmul(x: Tensor, qweight: Tensor, scales_and_zeros: Tensor, out_features: int, group_size: int,
                int8_activations: bool = False) -> Tensor:
    """x [rows, in] bf16 @ W.T -> fp32 [rows, out], W in torch's AVX2 int4 layout (blocks of 32 rows, half split)
    with bf16 scales and zeros [in / group_size, out, 2]; out_features a multiple of 32. With int8_activations, from
    INT4_INT8_ACTIVATIONS_MIN_ROWS rows x is quantized to int8 first (see the module's docstring)."""
    rows, in_features = x.shape
    x, scales_and_zeros = x.contiguous(), scales_and_zeros.contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    if int8_activations and rows >= INT4_INT8_ACTIVATIONS_MIN_ROWS:
        product = library().int4_matmul_int8_activations
    else:
        product = library().int4_matmul if rows < INT4_TILED_MIN_ROWS else library().int4_matmul_tiled
    return _checked(product(x.data_ptr(), qweight.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), rows,
                            out_features, in_features, group_size), out)


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [rows, in] bf16 @ (scales * qweight[:, :in]).T -> fp32 [rows, out]: qweight int8 [out, >= in] contiguous
    (Int8Linear's, padded), scales bf16 [out]; out a multiple of 4."""
    rows, in_features = x.shape
    x, scales = x.contiguous(), scales.contiguous()
    out = torch.empty(rows, qweight.shape[0], dtype=torch.float32)
    product = library().int8_matmul if rows <= INT8_MAX_ROWS else library().int8_matmul_tiled
    return _checked(product(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), rows,
                            qweight.shape[0], in_features, qweight.shape[1]), out)


def bf16_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x [rows, in] bf16 @ weight.T -> fp32 [rows, out] where takes_bf16(x, weight)."""
    rows, in_features = x.shape
    x = x.contiguous()
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    if runs_products():
        product = library().bf16_matmul if rows < BF16_TILED_MIN_ROWS else library().bf16_matmul_tiled
    elif rows <= BF16_DECODE_MAX_ROWS:
        product = library().bf16_decode
    else:
        return _checked(amx_library().bf16_matmul_amx(x.data_ptr(), rows, weight.data_ptr(), out.data_ptr(),
                                                      weight.shape[0], in_features), out)
    return _checked(product(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0], in_features),
                    out)


def amx_min_rows_int4(module) -> int:
    """The rows from which an Int4Linear's product takes AMX, below which int4_decode runs: official checkpoints'
    layers (quant.QuantizedLinear.official) with int16 activations, the others with int8 ones."""
    return AMX_MIN_ROWS_INT4_OFFICIAL if module.official else AMX_MIN_ROWS_INT4


def takes_int4_amx(x: Tensor, module) -> bool:
    """Whether int4_matmul_amx can run this Int4Linear's product for x: amx_min_rows_int4 to AMX_MAX_ROWS bf16 rows,
    torch's AVX-512 layout in whole blocks of 64 rows with bf16 scales, in_features in whole tiles."""
    return (amx_min_rows_int4(module) <= x.shape[0] <= AMX_MAX_ROWS and x.device.type == "cpu"
            and x.dtype == torch.bfloat16 and (module.block_rows, module.half_split) == (64, True)
            and module.out_features % 64 == 0
            and module.scales_and_zeros.dtype == torch.bfloat16 and module.in_features % 32 == 0
            and amx_library() is not None)


def int4_matmul_amx(x: Tensor, module) -> Tensor:
    """x [rows, in] bf16 @ W.T -> fp32 [rows, out] for an Int4Linear that takes_int4_amx."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    return _checked(amx_library().int4_matmul_amx(
        x.data_ptr(), x.shape[0], module.qweight.data_ptr(), module.scales_and_zeros.data_ptr(), out.data_ptr(),
        module.out_features, module.in_features, module.group_size), out)


def takes_int4_decode(x: Tensor, module) -> bool:
    """Whether int4_decode can run this Int4Linear's product for x: fewer than amx_min_rows_int4 bf16 rows, torch's
    AVX-512 layout in whole blocks of 64 rows with bf16 scales. On AMX CPUs only: the only AVX-512 CPUs it was
    measured on (elsewhere torch's kernel runs)."""
    return (x.shape[0] < amx_min_rows_int4(module) and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and (module.block_rows, module.half_split) == (64, True) and module.out_features % 64 == 0
            and module.scales_and_zeros.dtype == torch.bfloat16 and amx_library() is not None)


def int4_decode(x: Tensor, module) -> Tensor:
    """x [rows, in] bf16 @ W.T -> fp32 [rows, out] for an Int4Linear that takes_int4_decode: x quantized per block of
    32, to int16 in official checkpoints' layers, to int8 in the others (as the AVX2 product of int8 activations
    does), exact integer sums per block, then fp32."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    library = amx_library()
    kernel = library.int4_decode_int16_activations if module.official else library.int4_decode_int8_activations
    return _checked(kernel(
        x.data_ptr(), module.qweight.data_ptr(), module.scales_and_zeros.data_ptr(), out.data_ptr(), x.shape[0],
        module.out_features, module.in_features, module.group_size), out)


def takes_int8_amx(x: Tensor, module) -> bool:
    """Whether int8_matmul_amx can run this Int8Linear's product for x: AMX_MIN_ROWS_INT8 to AMX_MAX_ROWS bf16 rows,
    bf16 scales, widths in whole tiles."""
    return (AMX_MIN_ROWS_INT8 <= x.shape[0] <= AMX_MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and module.scales.dtype == torch.bfloat16 and module.qweight.is_contiguous()
            and module.out_features % 32 == 0 and module.in_features % 32 == 0 and amx_library() is not None)


def int8_matmul_amx(x: Tensor, module) -> Tensor:
    """x [rows, in] bf16 @ W.T -> fp32 [rows, out] for an Int8Linear that takes_int8_amx."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    return _checked(amx_library().int8_matmul_amx(
        x.data_ptr(), x.shape[0], module.qweight.data_ptr(), module.scales.data_ptr(), out.data_ptr(),
        module.out_features, module.in_features, module.qweight.shape[1]), out)


def takes_int4(x: Tensor, module) -> bool:
    """Whether int4_matmul can run this Int4Linear's product for x."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16
            and module.scales_and_zeros.dtype == torch.bfloat16 and (module.block_rows, module.half_split) == (32, True)
            and module.out_features % 32 == 0 and runs_products() and library() is not None)


def takes_int8(x: Tensor, module) -> bool:
    """Whether int8_matmul can run this Int8Linear's product for x: one row, or enough for the tiled product (in
    between torch's kernel is faster)."""
    rows = x.shape[0]
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16
            and (rows <= INT8_MAX_ROWS or rows >= INT8_TILED_MIN_ROWS) and module.scales.dtype == torch.bfloat16
            and module.qweight.is_contiguous() and module.out_features % 4 == 0 and runs_products()
            and library() is not None)


GGUF_KINDS = {"q8_0": 0, "q4_1": 1}   # gguf_matmul's kind argument


def takes_gguf(x: Tensor, module) -> bool:
    """Whether gguf_matmul can run this GGUFLinear's product for x: fp32, up to GGUF_MAX_ROWS rows, on any CPU with
    AVX2."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= GGUF_MAX_ROWS
            and module.out_features % 2 == 0 and library() is not None)


@functools.cache
def gguf_wide() -> bool:
    """Whether gguf_matmul runs its 512-bit loop: torch on its AVX-512 path (so ATEN_CPU_CAPABILITY=avx2 stands for an
    AVX2 CPU here too)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def gguf_matmul(x: Tensor, module) -> Tensor:
    """x [rows, in] fp32 (contiguous) @ W.T -> fp32 [rows, out] for a GGUFLinear that takes_gguf: each block's sum of
    code x activation in fp32, times its scale (Q4_1: plus its min x the block's sum of activations)."""
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    return _checked(library().gguf_matmul(GGUF_KINDS[module.kind], x.data_ptr(), module.qweight.data_ptr(),
                                          module.scales.data_ptr(), out.data_ptr(), x.shape[0], module.out_features,
                                          module.in_features, gguf_wide()), out)


def takes_gguf_amx(x: Tensor, module) -> bool:
    """Whether gguf_matmul_amx can run this GGUFLinear's product for x: bf16 (a layer kept at int8 / int4 reads
    prompts in bf16), more than GGUF_MAX_ROWS rows and up to AMX_MAX_ROWS_GGUF, on CPUs with AMX."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and GGUF_MAX_ROWS < x.shape[0] <= AMX_MAX_ROWS_GGUF
            and module.out_features % 32 == 0 and amx_library() is not None)


def gguf_matmul_amx(x: Tensor, module) -> Tensor:
    """x [rows, in] bf16 @ W.T -> fp32 [rows, out] for a GGUFLinear that takes_gguf_amx: the weights gguf_dequantize
    writes in bf16, multiplied a chunk at a time in L1 (kernels/matmul_amx.c)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    return _checked(amx_library().gguf_matmul_amx(GGUF_KINDS[module.kind], x.data_ptr(), x.shape[0],
                                                  module.qweight.data_ptr(), module.scales.data_ptr(), out.data_ptr(),
                                                  module.out_features, module.in_features), out)


def dequantizes_gguf(module) -> bool:
    """Whether gguf_dequantize can read this GGUFLinear's weights (on CPU, where the C library builds)."""
    return module.qweight.device.type == "cpu" and library() is not None


def gguf_dequantize(module, start: int, stop: int, out: Tensor | None = None) -> Tensor:
    """W[start:stop] of a GGUFLinear as fp32 [stop - start, in], in out's memory when given: exactly the weights; in
    bf16 (rounded to nearest even) when out is bf16."""
    rows, k = stop - start, module.in_features
    out = torch.empty(rows, k, dtype=torch.float32) if out is None else out[:rows * k].view(rows, k)
    if out.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"gguf_dequantize writes fp32 or bf16, not {out.dtype}")
    library().gguf_dequantize(GGUF_KINDS[module.kind], module.qweight.data_ptr(), module.scales.data_ptr(),
                              out.data_ptr(), start, stop, k, int(out.dtype == torch.bfloat16))
    return out


ATTN_MAX_HEADS_PER_GROUP = 64   # the kernel's bound on query heads sharing a key head


def takes_decode_attention(q: Tensor, k: Tensor, v: Tensor, caches: list[Tensor]) -> bool:
    """Whether decode_attention can attend q, k, v ([heads or groups, rows, D] views) on these KVCache tensors: fp32
    on CPU, D contiguous and a multiple of 8, on any CPU with AVX2."""
    return (q.device.type == "cpu" and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v))
            and q.shape[-1] % 8 == 0 and all(c.dtype == torch.float32 and c.is_contiguous() for c in caches)
            and q.shape[0] // caches[0].shape[2] <= ATTN_MAX_HEADS_PER_GROUP and library() is not None)


def decode_attention_plan(caches: list[Tensor], lengths: list[int]) -> Tensor:
    """What decode_attention needs of these KVCache tensors (positions reserved) in every layer of a step: int64
    [layers, sequences, 4], (keys address, values address, elements between key groups, length), the lengths counting
    the new position."""
    plan = torch.empty(caches[0].shape[0], len(caches), 4, dtype=torch.int64)
    for i, (t, length) in enumerate(zip(caches, lengths)):
        layers = torch.arange(t.shape[0], dtype=torch.int64) * (t.stride(0) * t.element_size())
        plan[:, i, 0] = layers + t.data_ptr()
        plan[:, i, 1] = layers + t.data_ptr() + t.stride(1) * t.element_size()
        plan[:, i, 2] = t.stride(2)
        plan[:, i, 3] = length
    return plan


def decode_attention(plan: Tensor, rows: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Sequence i of a decode step attends with row rows[i] (an int64 tensor) of q [heads, rows, D], k and v [groups,
    rows, D] (views, D contiguous) on its cache, as `plan` (a layer's decode_attention_plan) gives it: k and v stored
    at its last position first, then scaled by 1 / sqrt(D) as scaled_dot_product_attention does; [sequences, heads *
    D] fp32. One call for every sequence of the step (the kernel's comment says why)."""
    sequences, (heads, _, d), groups = plan.shape[0], q.shape, k.shape[0]
    strides = torch.tensor([*q.stride()[:2], *k.stride()[:2], *v.stride()[:2]], dtype=torch.int64)
    out = torch.empty(sequences, heads * d, dtype=torch.float32)
    return _checked(library().decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), strides.data_ptr(), rows.data_ptr(), plan.data_ptr(), sequences,
        heads, groups, d, d ** -0.5, out.data_ptr()), out)


def llama_decode_layers(x: Tensor, table: Tensor, cos: Tensor, sin: Tensor, plan: Tensor, config) -> Tensor:
    """Every layer of a Llama-family model (config: its GLMConfig) for one decode row per sequence, x [rows, hidden]
    fp32 in place: table of the layers' tensors' addresses (model_llama.layer_table), cos and sin [rows, head_dim]
    (fp32, contiguous), plan from decode_attention_plan. Returns x."""
    c = config
    return _checked(library().llama_decode_layers(
        x.data_ptr(), table.data_ptr(), c.num_layers, cos.data_ptr(), sin.data_ptr(), plan.data_ptr(), x.shape[0],
        c.hidden_size, c.num_heads, c.kv_groups, c.head_dim, c.ffn_hidden_size, c.norm_eps, gguf_wide()), x)


def takes_rms_norm(x: Tensor, weight: Tensor) -> bool:
    """Whether rms_norm can normalize x: fp32 rows and weight on CPU, contiguous, on any CPU with AVX2."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.is_contiguous() and weight.is_contiguous() and library() is not None)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight x (x x rsqrt(mean(x^2) + eps)) over the last dim of fp32 x, bit for bit as model.RMSNorm computes it in
    torch: the mean square by torch's own ops (its order of summing), the rest in one native call."""
    mean_square = x.pow(2).mean(-1)
    out = torch.empty_like(x)
    library().rms_norm_scale(x.data_ptr(), mean_square.data_ptr(), weight.data_ptr(), out.data_ptr(),
                             mean_square.numel(), x.shape[-1], eps)
    return out


def takes_bf16(x: Tensor, weight: Tensor) -> bool:
    """Whether bf16_matmul can run x @ weight.T: any rows on torch's AVX2 path; where decodes_bf16 takes the weight,
    decode rows (up to BF16_DECODE_MAX_ROWS), and up to AMX_MAX_ROWS_BF16 on CPUs with AMX."""
    if not (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and not weight.is_mkldnn and weight.is_contiguous()):
        return False
    if runs_products():
        return weight.shape[0] % 4 == 0 and weight.shape[1] % 16 == 0 and library() is not None
    if x.shape[0] <= BF16_DECODE_MAX_ROWS:
        return decodes_bf16(weight)
    return (x.shape[0] <= AMX_MAX_ROWS_BF16 and weight.shape[0] % 32 == 0 and decodes_bf16(weight)
            and amx_library() is not None)


@functools.cache
def avx512_bf16() -> bool:
    """Whether bf16_decode runs here: the CPU has AVX-512 bf16 and torch runs its AVX-512 path (held to AVX2 with
    ATEN_CPU_CAPABILITY, the process stands for an AVX2 CPU: its products run instead)."""
    return (wanted() and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and torch.cpu._is_avx512_bf16_supported())


def decodes_bf16(weight: Tensor) -> bool:
    """Whether bf16_decode can multiply by this bf16 weight (plain, on CPU, out a multiple of 8 and in of 32), so that
    quant.route_linears leaves it plain rather than packing it for oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not weight.is_mkldnn
            and weight.dim() == 2 and weight.is_contiguous() and weight.shape[0] % 8 == 0
            and weight.shape[1] % 32 == 0 and avx512_bf16() and library() is not None)


def dequantizes_int4(module, dtype: torch.dtype, stop: int) -> bool:
    """Whether int4_dequantize_bf16 can dequantize this Int4Linear's rows up to stop into dtype: bf16, CPU, whole
    half-split blocks (torch's AVX-512 and AVX2 layouts; a tail block pairs its rows) with bf16 scales."""
    return (dtype == torch.bfloat16 and module.qweight.device.type == "cpu" and module.half_split
            and stop <= module.out_features // module.block_rows * module.block_rows
            and module.scales_and_zeros.dtype == torch.bfloat16 and library() is not None)


def _bf16_scratch(out: Tensor | None, rows: int, cols: int) -> Tensor:
    """[rows, cols] bf16 in out's memory (a flat scratch buffer), or a new tensor."""
    return torch.empty(rows, cols, dtype=torch.bfloat16) if out is None else out[:rows * cols].view(rows, cols)


def int4_dequantize_bf16(module, start: int, stop: int, out: Tensor | None = None) -> Tensor:
    """W[start:stop] of an Int4Linear (start and stop on its block edges) as bf16 [in, stop - start], in out's memory
    when given: one pass instead of torch's four, the same values (the C function's comment says why)."""
    cols, k = stop - start, module.in_features
    out = _bf16_scratch(out, k, cols)
    library().int4_dequantize_bf16(module.qweight.data_ptr(), module.scales_and_zeros.data_ptr(), out.data_ptr(),
                                   start, stop, module.out_features, k, module.group_size, module.block_rows)
    return out


def dequantizes_int8(module, dtype: torch.dtype) -> bool:
    """Whether int8_dequantize_bf16 can dequantize this Int8Linear into dtype: bf16, CPU, bf16 scales."""
    return (dtype == torch.bfloat16 and module.qweight.device.type == "cpu" and module.qweight.is_contiguous()
            and module.scales.dtype == torch.bfloat16 and library() is not None)


def int8_dequantize_bf16(module, start: int, stop: int, out: Tensor | None = None) -> Tensor:
    """W[start:stop] of an Int8Linear as bf16 [stop - start, in], in out's memory when given: the values torch.mul
    gives."""
    rows, k = stop - start, module.in_features
    out = _bf16_scratch(out, rows, k)
    library().int8_dequantize_bf16(module.qweight.data_ptr(), module.scales.data_ptr(), out.data_ptr(), start, stop,
                                   k, module.qweight.shape[1])
    return out
