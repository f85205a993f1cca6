"""Load an official ChatGLM checkpoint (v1, v2, v3; fp16 or pre-quantized int4/int8) into the native model.

The model is built on the meta device and filled one tensor at a time: safetensors shards are mapped and each
tensor's pages are dropped once it has been copied to the target dtype and device (read_safetensors), so the
fp16 state dict is never whole in memory, nor is a shard. For int8/int4 from full-precision weights, each block
linear is quantized (a slice of rows at a time) as soon as its weight and bias have been read, and freed memory
goes back to the OS at once. The output layer and the embedding table become int8 at both precisions: they are
the largest matrices, int8 halves them, and it keeps the logits closer than int4 would (llama.cpp's quantization
mixes do the same). Quantized models compute in fp32 on CPU (their linears round inputs to bf16, see quant).
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import pickle
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from . import quant
from .config import GLMConfig, load_config
from .registry import PRECISIONS

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (index, single file) pairs in the order transformers prefers them
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))
HUB_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt"]        # config, tokenizer and index files
HUB_WEIGHTS = (["*.safetensors"], ["pytorch_model*.bin"])      # fetch one weight format, not both
EXPECTED_FILES = ("config.json, tokenizer_config.json, tokenizer.model (ChatGLM2/3) or ice_text.model (ChatGLM-6B), "
                  "and the weights: model.safetensors, model-*.safetensors + model.safetensors.index.json, "
                  "pytorch_model.bin, or pytorch_model-*.bin + pytorch_model.bin.index.json")

Progress = Callable[[int, int, str], None]


class CheckpointError(ValueError):
    """The checkpoint cannot give this model: the message names the file and the tensor."""


def resolve_model_dir(path_or_id: str | Path) -> Path:
    """A local model directory as is; anything else is taken for a Hub id and fetched (or found in the cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a model is a directory holding {EXPECTED_FILES}")
    from huggingface_hub import snapshot_download
    for weights in HUB_WEIGHTS:
        try:
            folder = Path(snapshot_download(str(path_or_id), allow_patterns=HUB_FILES + weights))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{str(path_or_id)!r} is not a local directory and could not be fetched from the Hub "
                                  f"({e}). A model directory holds {EXPECTED_FILES}") from e
        if any(folder.glob(pattern) for pattern in weights):
            return folder
    raise CheckpointError(f"the Hub repo {str(path_or_id)!r} has no weights; expected {EXPECTED_FILES}")


def shard_files(model_dir: Path) -> list[Path]:
    """The weight files to read, safetensors first, checking that every shard an index names is there."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        index = model_dir / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid index (a JSON object with a weight_map): {e}") from e
            missing = [name for name in names if not (model_dir / name).is_file()]
            if missing:
                raise CheckpointError(f"{index} references {', '.join(missing)}, missing from {model_dir}")
            return [model_dir / name for name in names]
        if (model_dir / single_name).is_file():
            return [model_dir / single_name]
    raise CheckpointError(f"{model_dir} holds no weights; expected {EXPECTED_FILES}")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor entries of a .safetensors header, and the byte offset where tensor data starts."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if not 2 <= size <= file_size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (header of {size} bytes, file of {file_size})")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + size


def read_safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of a .safetensors file in file order, as views of a memory map (no copy). Once the
    caller moves on to the next tensor the previous one's pages are dropped from this process (the page cache
    keeps them; a view still in use reads them back): resident memory holds about one tensor of the shard, not
    every page read so far, which a plain memory map would keep until the shard closes."""
    header, base = safetensors_header(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # copy-on-write: writable views, file untouched
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which ChatGLM never stores")
        if base + end > file_size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {base + end}, "
                                  f"the file has {file_size}")
        if end == begin:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=base + begin)
        yield name, data.view(dtype).reshape(info["shape"])
        if hasattr(mapped, "madvise"):   # not on Windows
            first_page = (base + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, first_page, base + end - first_page)


def largest_tensor_bytes(path: Path) -> int:
    """Bytes of the largest tensor of a safetensors shard (0 for other formats or a bad header: reading the
    shard reports those)."""
    if path.suffix != ".safetensors":
        return 0
    try:
        header, _ = safetensors_header(path)
        return max((end - begin for begin, end in (info["data_offsets"] for info in header.values())), default=0)
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return 0


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)   # glibc only
    except (OSError, TypeError):
        return None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps freed blocks under 32 MB for reuse, and loading frees
    a float copy of every layer: without this the peak RSS counts them all (measured 0.9 GiB on ChatGLM2-6B)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def read_shard(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of one shard, never the whole shard in memory at once."""
    try:
        if path.suffix == ".safetensors":
            yield from read_safetensors(path)
        else:
            yield from torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {e}") from e


def compute_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype of activations and of every tensor but the quantized layers. int8/int4 compute in fp32 on CPU
    (their linears take bf16 inputs, see quant; fp32 is also the official CPU recipe, `model.float()`) and in
    fp16 elsewhere."""
    if precision in FLOAT_DTYPES:
        return FLOAT_DTYPES[precision]
    return torch.float32 if device == "cpu" else torch.float16


def build_model(config: GLMConfig, dtype: torch.dtype) -> nn.Module:
    """The native model for this version, on the meta device: shapes only, no memory."""
    if config.version == 1:
        from .model_v1 import ChatGLMv1 as model_class
    else:
        from .model import ChatGLM as model_class
    with torch.device("meta"):
        return model_class(config).to(dtype)


def quantized_shapes(linear: nn.Linear, stored_bits: int) -> dict[str, tuple[int, ...]]:
    """Expected shape of each stored part of one block linear."""
    out_features, in_features = linear.weight.shape
    shapes = {"weight": (out_features, in_features // 2 if stored_bits == 4 else in_features)}
    if stored_bits:
        shapes["weight_scale"] = (out_features,)
    if linear.bias is not None:
        shapes["bias"] = (out_features,)
    return shapes


def quantized_linear(parts: dict[str, Tensor], stored_bits: int, precision: str, dtype: torch.dtype,
                     device: str, exact: bool) -> nn.Module:
    """One linear from its stored parts: an official quantized layer as stored, or quantized here on the target
    device (the int4 packing is per device); `exact` keeps inputs in the compute dtype (see load_model)."""
    bias = parts.get("bias")
    bias = None if bias is None else bias.to(device=device, dtype=dtype)
    activation = None if exact else quant.activation_dtype_for(device)
    if stored_bits:
        scale = parts["weight_scale"].to(device=device, dtype=activation or dtype)
        return quant.from_official(parts["weight"].to(device), scale, stored_bits, bias, activation)
    return quant.quantize_linear(parts["weight"].to(device), bias, precision, activation_dtype=activation)


def tied_names(model: nn.Module) -> dict[str, str]:
    """alias -> owner for parameters registered under two names (v1's lm_head.weight is the embedding)."""
    owners: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied[name] = owners[id(param)]
        else:
            owners[id(param)] = name
    return tied


def put(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, value)


def load_model(model_dir: str | Path, precision: str = "bf16", device: str = "cpu",
               progress: Progress | None = None, exact: bool = False) -> nn.Module:
    """Build ChatGLM (v2/v3) or ChatGLMv1 from a directory or Hub id at a precision: fp32 bf16 fp16 int8 int4,
    computing in compute_dtype. progress(shards_done, shards_total, filename) runs after each shard.
    `exact`: quantized linears take their inputs in the compute dtype as the official code does (its CPU outputs
    op for op, from a pre-quantized checkpoint) instead of rounded to bf16 for the fast kernels (see quant). It is
    for checking: decode gets about 100x slower on CPU."""
    if precision not in PRECISIONS:
        raise CheckpointError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    model_dir = resolve_model_dir(model_dir)
    config = load_config(model_dir)
    stored_bits = config.quantization_bit
    if stored_bits and precision != f"int{stored_bits}":
        raise CheckpointError(f"{model_dir} holds official int{stored_bits} weights (config.json quantization_bit="
                              f"{stored_bits}); it can be loaded as int{stored_bits} only, not {precision}")
    # the shard with the largest matrix (the output layer) first, while little else is resident
    shards = sorted(shard_files(model_dir), key=largest_tensor_bytes, reverse=True)
    dtype = compute_dtype(precision, device)
    model = build_model(config, dtype)
    tied = tied_names(model)
    params = {name: param for name, param in model.named_parameters(remove_duplicate=False) if name not in tied}
    quantized: dict[str, str] = {}  # linear -> the precision it takes
    if precision in ("int8", "int4"):
        quantized = dict.fromkeys(model.quantizable, precision)
        if not stored_bits:
            quantized.update(dict.fromkeys(model.output_layers, "int8"))
    int8_tables = {f"{name}.weight" for name, module in model.named_modules()   # quantized from full precision
                   if isinstance(module, nn.Embedding) and quantized and not stored_bits}
    pending: dict[str, dict[str, Tensor]] = {}  # block linear -> the parts of it read so far

    def check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], path: Path) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{path.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"the config ({model_dir / 'config.json'}) expects {tuple(expected)}")

    for done, path in enumerate(shards, 1):
        for name, tensor in read_shard(path):
            module_name, _, leaf = name.rpartition(".")
            if leaf == "inv_freq":              # rotary frequencies are recomputed
                continue
            if name in tied:
                check_shape(name, tensor, params[tied[name]].shape, path)
            elif module_name in quantized:
                shapes = quantized_shapes(model.get_submodule(module_name), stored_bits)
                if leaf not in shapes:
                    raise CheckpointError(f"{path.name}: unknown tensor {name} for an int{stored_bits or 16} linear")
                check_shape(name, tensor, shapes[leaf], path)
                parts = pending.setdefault(module_name, {})
                parts[leaf] = tensor
                if parts.keys() == shapes.keys():
                    put(model, module_name, quantized_linear(pending.pop(module_name), stored_bits,
                                                             quantized[module_name], dtype, device, exact))
                    del parts, tensor
                    release_freed_memory()
            elif name in params:
                check_shape(name, tensor, params[name].shape, path)
                if name in int8_tables:
                    scale_dtype = quant.activation_dtype_for(device) or dtype   # as the tied output layer's
                    put(model, module_name, quant.Int8Embedding.quantize(tensor.to(device), scale_dtype))
                else:
                    value = tensor.to(device=device, dtype=dtype, copy=True)    # own memory: the file buffer goes
                    put(model, name, nn.Parameter(value, requires_grad=False))
            else:
                raise CheckpointError(f"{path.name}: unknown tensor {name}, not part of a ChatGLM"
                                      f"{'' if config.version == 1 else config.version}-6B model")
        if progress is not None:
            progress(done, len(shards), path.name)

    for alias, owner in tied.items():
        table = model.get_submodule(owner.rpartition(".")[0])
        if isinstance(table, quant.Int8Embedding):   # ChatGLM-6B's output layer is its embedding table
            put(model, alias.rpartition(".")[0], table.as_linear(None if exact else quant.activation_dtype_for(device)))
        else:
            put(model, alias, model.get_parameter(owner))
    missing = [f"{module}.{leaf}" for module, parts in pending.items()
               for leaf in quantized_shapes(model.get_submodule(module), stored_bits) if leaf not in parts]
    missing += [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{model_dir}: tensors missing after reading {', '.join(p.name for p in shards)}: "
                              f"{listed}")
    if not exact:
        quant.route_linears(model)
    return model.eval()
