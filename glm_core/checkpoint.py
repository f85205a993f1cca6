"""Load an official ChatGLM checkpoint (v1, v2, v3; fp16 or pre-quantized int4/int8) into the native model.

The model is built on the meta device and filled one shard at a time: each tensor is copied to the target
dtype and device as it is read and the shard is dropped before the next one opens, so the fp16 state dict
is never whole in memory. For int8/int4 from full-precision weights, each block linear is quantized as soon
as its weight and bias have been read.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
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


def read_shard(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of one shard, touching the file lazily (mmap) rather than reading it whole."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()
    except (RuntimeError, OSError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {e}") from e


def compute_dtype(precision: str, device: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of activations and of every tensor but the quantized linears' integers. int8/int4 default to
    bf16 on CPU and fp16 elsewhere; fp32 reproduces the official CPU recipe (`model.float()`)."""
    if precision in FLOAT_DTYPES:
        if dtype not in (None, FLOAT_DTYPES[precision]):
            raise CheckpointError(f"dtype {dtype} contradicts precision {precision}; dtype is for int8/int4 only")
        return FLOAT_DTYPES[precision]
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device == "cpu" else torch.float16


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
                     device: str) -> nn.Module:
    """One block linear from its stored parts. Quantized on the target device (the int4 packing is per device)
    from weights in the compute dtype, so its scales hold exactly in the dtype they are kept in."""
    bias = parts.get("bias")
    bias = None if bias is None else bias.to(device=device, dtype=dtype)
    if stored_bits:
        layer = quant.from_official(parts["weight"].to(device), parts["weight_scale"].to(device), stored_bits, bias)
    else:
        layer = quant.quantize_linear(parts["weight"].to(device=device, dtype=dtype), bias, precision)
    return layer.to(dtype)


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
               progress: Progress | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Build ChatGLM (v2/v3) or ChatGLMv1 from a directory or Hub id at a precision: fp32 bf16 fp16 int8 int4.
    progress(shards_done, shards_total, filename) runs after each shard; dtype: see compute_dtype."""
    if precision not in PRECISIONS:
        raise CheckpointError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    model_dir = resolve_model_dir(model_dir)
    config = load_config(model_dir)
    stored_bits = config.quantization_bit
    if stored_bits and precision != f"int{stored_bits}":
        raise CheckpointError(f"{model_dir} holds official int{stored_bits} weights (config.json quantization_bit="
                              f"{stored_bits}); it can be loaded as int{stored_bits} only, not {precision}")
    shards = shard_files(model_dir)
    dtype = compute_dtype(precision, device, dtype)
    model = build_model(config, dtype)
    tied = tied_names(model)
    params = {name: param for name, param in model.named_parameters(remove_duplicate=False) if name not in tied}
    quantized = set(model.quantizable) if precision in ("int8", "int4") else set()
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
                    put(model, module_name, quantized_linear(pending.pop(module_name), stored_bits, precision,
                                                             dtype, device))
            elif name in params:
                check_shape(name, tensor, params[name].shape, path)
                value = tensor.to(device=device, dtype=dtype, copy=True)    # own memory: the shard is about to go
                put(model, name, nn.Parameter(value, requires_grad=False))
            else:
                raise CheckpointError(f"{path.name}: unknown tensor {name}, not part of a ChatGLM"
                                      f"{'' if config.version == 1 else config.version}-6B model")
        if progress is not None:
            progress(done, len(shards), path.name)

    for alias, owner in tied.items():
        put(model, alias, model.get_parameter(owner))
    missing = [f"{module}.{leaf}" for module, parts in pending.items()
               for leaf in quantized_shapes(model.get_submodule(module), stored_bits) if leaf not in parts]
    missing += [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{model_dir}: tensors missing after reading {', '.join(p.name for p in shards)}: "
                              f"{listed}")
    return model.eval()
