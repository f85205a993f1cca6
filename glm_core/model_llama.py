"""Llama-family transformers models (Llama, SmolLM2 the embedded model, Qwen2, Mistral without a sliding window) on
this package's ChatGLM2 blocks, which compute the same thing: pre-RMSNorm blocks, grouped-query attention, a SwiGLU
MLP. What differs is rotary embeddings (over the whole head dim, halves rotated, at the frequencies transformers
computes for the model's rope scaling) and an output layer often tied to the embedding table.

Why not transformers' own forward: a decode step of the embedded model is a few hundred small products and
elementwise ops, and the Python around them is most of its time. These blocks do the per-step work once for the
whole step, with q/k/v and gate/up fused into one product each (3 and 2 weight reads and calls become 1 and 1), on
the KVCache and batching the ChatGLM models have (model.ChatGLM, batch.NativeBatcher), CUDA graphs included. On a
2-core AMX Xeon the embedded model at int4 generated 59-61 tok/s through transformers and 74-77 on these blocks, the
same build otherwise (BENCHMARKS.md). Where every product is a GGUF block tensor (the embedded model in fp32), a decode
step runs all the layers in one native call (Llama.layers, native.llama_decode_layers): 57 -> 166-171 tok/s there.

`from_transformers(hf)` builds the model from a loaded transformers one, copying its weights layer by layer (the
fused ones concatenated) and dropping each layer as it goes; None, with the reason logged, for a model these blocks
do not compute exactly, which then runs through transformers (batch.PaddedBatcher).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from . import native
from .config import GLMConfig
from .kvcache import KVCache
from .model import ChatGLM, GLMBlock, RMSNorm
from .quant import GGUFLinear

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "qwen2", "mistral")
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")   # frequencies that change with the sequence: transformers' to run


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [rows, heads, head_dim] with positions applied as transformers' Llama does: cos, sin [rows, 1, head_dim]
    over the two halves of each head."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Llama(ChatGLM):
    """A Llama-family model in ChatGLM's module tree (config.version 0): its verbs, cache and batching; the norms round
    as transformers' Llama rounds them (bit for bit the same logits in bf16 too)."""

    def __init__(self, config: GLMConfig, inv_freq: Tensor, attention_scaling: float):
        super().__init__(config, rotate=rotate_half)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.round_first = True
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling
        self.native_layers: tuple[Tensor | None] | None = None   # (layer_table's table,) once built

    def _apply(self, fn, *args, **kwargs):
        self.native_layers = None   # moved or cast: the table's addresses are the old tensors'
        return super()._apply(fn, *args, **kwargs)

    def layers(self, x: Tensor, cos: Tensor, sin: Tensor, spans: list[tuple[KVCache, int, int]]) -> Tensor:
        """ChatGLM.layers; a decode step (one row per sequence, up to native.GGUF_MAX_ROWS) of a model whose products
        are all GGUF block tensors in fp32 (the embedded model's default) runs them in one native call
        (native.llama_decode_layers)."""
        table = None
        if all(T == 1 for _, _, T in spans) and len(spans) <= native.GGUF_MAX_ROWS:
            if self.native_layers is None:   # built once (600 us on the embedded model), dropped by _apply
                self.native_layers = (layer_table(self.transformer.encoder.layers),)
            table = self.native_layers[0]
        if table is None or x.dtype != torch.float32 or any(cache.dtype != torch.float32 for cache, _, _ in spans):
            return super().layers(x, cos, sin, spans)
        plan = native.decode_attention_plan([cache.tensor for cache, _, _ in spans],
                                            [start + 1 for _, start, _ in spans])
        return native.llama_decode_layers(x.contiguous(), table, cos[:, 0].contiguous(), sin[:, 0].contiguous(), plan,
                                          self.config)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """As transformers' rotary embedding: fp32 angles, cos and sin times the rope's attention scaling, rounded to
        the compute dtype; [rows, 1, head_dim]."""
        angles = torch.outer(positions.float(), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return ((angles.cos() * self.attention_scaling).to(self.dtype),
                (angles.sin() * self.attention_scaling).to(self.dtype))


def layer_table(blocks: list[GLMBlock]) -> Tensor | None:
    """native.llama_decode_layers' table of these blocks: their tensors' addresses, int64 [layers x 15] in the order
    its comment gives; None unless every product is a GGUFLinear it takes (an even number of outputs, no bias but
    qkv's), the norms and that bias fp32, the heads as decode_attention takes them and the library built."""
    if native.library() is None:
        return None
    table = []
    for block in blocks:
        attention, mlp = block.self_attention, block.mlp
        qkv, dense, gate_up, down = attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h
        norm_in, norm_post = block.input_layernorm.weight, block.post_attention_layernorm.weight
        vectors = [norm_in, norm_post] + ([] if qkv.bias is None else [qkv.bias])
        if not all(isinstance(p, GGUFLinear) and p.out_features % 2 == 0 and p.qweight.device.type == "cpu"
                   for p in (qkv, dense, gate_up, down)) or any(p.bias is not None for p in (dense, gate_up, down)):
            return None
        if (any(v.dtype != torch.float32 or not v.is_contiguous() for v in vectors) or attention.head_dim % 8
                or attention.num_heads // attention.kv_groups > native.ATTN_MAX_HEADS_PER_GROUP):
            return None
        table += [norm_in.data_ptr(), *_fields(qkv), 0 if qkv.bias is None else qkv.bias.data_ptr(), *_fields(dense),
                  norm_post.data_ptr(), *_fields(gate_up), *_fields(down)]
    return torch.tensor(table, dtype=torch.int64)


def _fields(product: GGUFLinear) -> tuple[int, int, int]:
    return native.GGUF_KINDS[product.kind], product.qweight.data_ptr(), product.scales.data_ptr()


def unsupported(hf) -> str | None:
    """Why these blocks would not compute this transformers model exactly, or None when they do."""
    config = hf.config
    if config.model_type not in MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}, not silu"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window layers"
    if getattr(config, "sliding_window", None) and (config.model_type == "mistral"
                                                    or getattr(config, "use_sliding_window", False)):
        return "a sliding window"
    rope = getattr(hf.model, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") in LENGTH_DEPENDENT_ROPE:
        return f"rope {getattr(rope, 'rope_type', None)!r}"
    for layer in hf.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        biases = [attention.q_proj.bias is not None, attention.k_proj.bias is not None,
                  attention.v_proj.bias is not None]
        if len(set(biases)) > 1 or attention.o_proj.bias is not None or any(
                getattr(mlp, name).bias is not None for name in ("gate_proj", "up_proj", "down_proj")):
            return "biases other than on q, k and v together"
    return None


def from_transformers(hf) -> Llama | None:
    """The model of a loaded transformers Llama-family model, its weights copied (hf is emptied of its layers as they
    are copied), or None when `unsupported` says why not (logged)."""
    reason = unsupported(hf)
    if reason is not None:
        log.info("%s runs on transformers' forward: %s", type(hf).__name__, reason)
        return None
    c, layers = hf.config, hf.model.layers
    first = layers[0].self_attn
    config = GLMConfig(
        version=0, num_layers=len(layers), hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
        head_dim=first.head_dim, kv_groups=c.num_key_value_heads, ffn_hidden_size=c.intermediate_size,
        vocab_size=hf.model.embed_tokens.num_embeddings, seq_length=c.max_position_embeddings,
        norm_eps=hf.model.norm.variance_epsilon, qkv_bias=first.q_proj.bias is not None)
    rope = hf.model.rotary_emb
    with torch.device("meta"):
        model = Llama(config, torch.empty(0), rope.attention_scaling)
    model.inv_freq = rope.inv_freq.detach().float().clone()
    parts = model.transformer
    table = hf.model.embed_tokens.weight
    parts.embedding.word_embeddings.weight = _own(table)
    tied = hf.lm_head.weight is table
    parts.output_layer.weight = parts.embedding.word_embeddings.weight if tied else _own(hf.lm_head.weight)
    parts.encoder.final_layernorm.weight = _own(hf.model.norm.weight)
    for i, (block, layer) in enumerate(zip(parts.encoder.layers, layers)):
        attention, mlp = layer.self_attn, layer.mlp
        _take(block.self_attention.query_key_value, [attention.q_proj, attention.k_proj, attention.v_proj])
        _take(block.self_attention.dense, [attention.o_proj])
        _take(block.mlp.dense_h_to_4h, [mlp.gate_proj, mlp.up_proj])
        _take(block.mlp.dense_4h_to_h, [mlp.down_proj])
        block.input_layernorm.weight = _own(layer.input_layernorm.weight)
        block.post_attention_layernorm.weight = _own(layer.post_attention_layernorm.weight)
        layers[i] = nn.Identity()   # the block holds copies: the layer's tensors go
    return model.eval()


def _own(tensor: Tensor) -> nn.Parameter:
    """A copy in memory of its own. transformers' weights may be pages of a mapped safetensors file, which stays
    resident (the whole file) while any tensor of it lives: copies let it go with the transformers model."""
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


def _take(target: nn.Linear, sources: list[nn.Linear]) -> None:
    """target's weight (and bias) = the sources' stacked by rows, in memory of its own (torch.cat copies)."""
    target.weight = nn.Parameter(torch.cat([s.weight.detach() for s in sources]), requires_grad=False)
    if sources[0].bias is not None:
        target.bias = nn.Parameter(torch.cat([s.bias.detach() for s in sources]), requires_grad=False)
