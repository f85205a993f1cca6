"""GLMConfig: the shape of a ChatGLM checkpoint, read from its official config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """The directory does not hold a ChatGLM config this code can run."""


@dataclass
class GLMConfig:
    version: int                 # 1 = ChatGLM-6B, 2 = ChatGLM2-6B, 3 = ChatGLM3-6B; 0 = a Llama on v2's blocks
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int                # kv_channels for v2/v3
    kv_groups: int               # multi_query_group_num; v1 has one KV head per query head
    ffn_hidden_size: int
    vocab_size: int              # rows of the embedding / output layer (padded, may exceed the tokenizer)
    seq_length: int              # the context the model was trained for
    norm_eps: float = 1e-5
    rope_ratio: float = 1.0      # 32k variants stretch rotary positions by this factor
    qkv_bias: bool = True
    quantization_bit: int = 0    # 4 or 8 for pre-quantized official checkpoints
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    # v1 special ids, read from its config.json (defaults: the real ChatGLM-6B ids); v2/v3 do not use them
    bos_token_id: int = 130004   # <sop>: the first one ends the bidirectional context
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]

    @property
    def context_length(self) -> int:
        return self.seq_length


def detect_version(raw: dict, tokenizer_config: dict) -> int:
    """v1 has its own keys; v2 and v3 share config keys, so the names and the tokenizer tell them apart."""
    if raw.get("model_type") != "chatglm":
        raise ConfigError(f"model_type is {raw.get('model_type')!r}, not 'chatglm'")
    if "inner_hidden_size" in raw or raw.get("position_encoding_2d"):
        return 1
    names = " ".join(str(x) for x in (raw.get("_name_or_path"), tokenizer_config.get("name_or_path")))
    tokens = json.dumps(tokenizer_config.get("added_tokens_decoder", {})) + str(tokenizer_config.get("chat_template", ""))
    if "chatglm3" in names.lower() or "<|user|>" in tokens:
        return 3
    return 2


# Options of the official ChatGLM2/3 config that the native model implements at one value only.
FIXED_V2_OPTIONS = {"rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
                    "add_bias_linear": False, "original_rope": True, "pre_seq_len": None}


def check_v2_options(raw: dict, path: Path) -> None:
    for key, supported in FIXED_V2_OPTIONS.items():
        if raw.get(key, supported) != supported:
            raise ConfigError(f"{path}: {key}={raw[key]!r} is not supported; the native ChatGLM2/3 model "
                              f"implements {key}={supported!r} only (the released checkpoints' value)")


def load_config(model_dir: str | Path) -> GLMConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a ChatGLM checkpoint directory holds config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    tok_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tok_path.read_text(encoding="utf-8")) if tok_path.is_file() else {}
    version = detect_version(raw, tokenizer_config)
    try:
        if version == 1:
            hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
            return GLMConfig(
                version=1, num_layers=raw["num_layers"], hidden_size=hidden, num_heads=heads,
                head_dim=hidden // heads, kv_groups=heads, ffn_hidden_size=raw.get("inner_hidden_size", 4 * hidden),
                vocab_size=raw["vocab_size"], seq_length=raw.get("max_sequence_length", 2048),
                norm_eps=raw.get("layernorm_epsilon", 1e-5), qkv_bias=True,
                quantization_bit=raw.get("quantization_bit", 0) or 0,
                eos_token_id=raw.get("eos_token_id", 130005), pad_token_id=raw.get("pad_token_id", 3),
                torch_dtype=raw.get("torch_dtype", "float16"),
                bos_token_id=raw.get("bos_token_id", 130004), mask_token_id=raw.get("mask_token_id", 130000),
                gmask_token_id=raw.get("gmask_token_id", 130001),
            )
        check_v2_options(raw, path)
        if not raw.get("multi_query_attention", False):
            groups = raw["num_attention_heads"]
        else:
            groups = raw["multi_query_group_num"]
        return GLMConfig(
            version=version, num_layers=raw["num_layers"], hidden_size=raw["hidden_size"],
            num_heads=raw["num_attention_heads"], head_dim=raw["kv_channels"], kv_groups=groups,
            ffn_hidden_size=raw["ffn_hidden_size"], vocab_size=raw["padded_vocab_size"],
            seq_length=raw.get("seq_length", 2048), norm_eps=raw.get("layernorm_epsilon", 1e-5),
            rope_ratio=float(raw.get("rope_ratio", 1.0)), qkv_bias=raw.get("add_qkv_bias", True),
            quantization_bit=raw.get("quantization_bit", 0) or 0,
            eos_token_id=raw.get("eos_token_id", 2), pad_token_id=raw.get("pad_token_id", 0),
            torch_dtype=raw.get("torch_dtype", "float16"),
        )
    except KeyError as e:
        raise ConfigError(f"{path} lacks the key {e.args[0]!r} that a ChatGLM v{version} config needs") from e
