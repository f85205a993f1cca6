"""ChatGLM-6B (v1) in plain PyTorch, numerically following the official THUDM/chatglm-6b modeling code.

What sets v1 apart from v2/v3: LayerNorm and tanh-GELU, DeepNorm residuals (`LN(x)·√(2L) + f(LN(x))`),
per-head interleaved qkv rows, 2-D rotary embeddings (first half of each head by position, second half by
block position) and a prefix-LM mask: everything before the first <sop> sees everything before it, the
rest is causal. The module tree mirrors the official parameter names, so a checkpoint loads by name.
Segments, caches and the single-sequence verbs work as in model.py; a cache's `layout` is (context length, mask
position) of the prompt it was started with.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from .config import GLMConfig
from .kvcache import KVCache, common_prefix
from .model import Segment, SequenceVerbs, attention_kernels, linear
# The official GLMBlock takes num_layers=28 as a default argument that ChatGLMModel never passes, so the
# DeepNorm factor is √(2·28) whatever config.num_layers says (the tiny test checkpoint shows it).
DEEPNORM_LAYERS = 28
# Not cuDNN: it builds a new plan for every key length, about 2 ms of CPU per layer per decoded token.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def context_layout(ids: list[int], config: GLMConfig) -> tuple[int, int]:
    """(context_length, mask_position) as the official model finds them: the index of the first <sop>,
    and the index of the first [gMASK], or of the first [MASK] when there is no [gMASK]."""
    if config.bos_token_id not in ids:
        # The official get_masks() fails the same way (list.index on a missing id).
        raise ValueError(f"ChatGLM-6B input needs a <sop> (id {config.bos_token_id}) after the context")
    mask_token = config.gmask_token_id if config.gmask_token_id in ids else config.mask_token_id
    if mask_token not in ids:
        raise ValueError(f"ChatGLM-6B input needs a [gMASK] (id {config.gmask_token_id}) "
                         f"or [MASK] (id {config.mask_token_id}) before the <sop>")
    return ids.index(config.bos_token_id), ids.index(mask_token)


def position_ids(start: int, length: int, context_length: int, mask_position: int,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """2-D positions of the ids at start..start+length: (position, block position).
    The context counts 0, 1, 2, ...; from the <sop> on every id sits at the mask position and the
    block position counts 1, 2, 3, ... (0 in the context)."""
    i = torch.arange(start, start + length, device=device)
    return torch.where(i < context_length, i, mask_position), (i - context_length + 1).clamp(min=0)


def attention_mask(start: int, length: int, context_length: int, device: torch.device | None = None) -> Tensor:
    """[length, start+length] bool, True = may attend: all of the context, and causally after it."""
    rows = torch.arange(start, start + length, device=device)[:, None]
    cols = torch.arange(start + length, device=device)[None, :]
    return (cols <= rows) | (cols < context_length)


def rotary_table(config: GLMConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin [seq_length + 1, head_dim/4] in fp32. The official inv_freq is rounded to fp16 before
    use; exact fp32 frequencies move the logits of long inputs visibly, so the rounding is kept."""
    dim = config.head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half().float()
    angles = torch.outer(torch.arange(config.seq_length + 1, dtype=torch.float32), inv_freq)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim]; cos/sin [T, 1, 2, 1, head_dim/4] (position half, block half).
    rotate_half within each half of the head: pairs (i, i + head_dim/4)."""
    parts = x.float().unflatten(-1, (2, 2, -1))           # [T, heads, half, part, head_dim/4]
    first, second = parts.unbind(-2)
    rotated = torch.stack((-second, first), dim=-2)
    return (parts * cos + rotated * sin).flatten(-3).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.layer_id = layer_id
        inner = config.num_heads * config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * inner, bias=True)
        self.dense = nn.Linear(inner, config.hidden_size, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int,
                spans: list[tuple[KVCache, int, int, Tensor | None]]) -> Tensor:
        """x [rows, hidden] of every segment; spans (cache, start, length, mask) as in model.SelfAttention."""
        rows = x.shape[0]
        # Rows are per head [h0 q,k,v | h1 q,k,v | ...]; q and k are rotated in one go.
        qkv = linear(self.query_key_value, x).view(rows, self.num_heads, 3, self.head_dim)
        qk = apply_rotary(qkv[:, :, :2].flatten(1, 2), cos, sin).view(rows, self.num_heads, 2, self.head_dim)
        q, k, v = (t.transpose(0, 1) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))   # [heads, rows, d]
        # The official layer-wise scaling: q / (√d·(layer+1)), then scores·(layer+1) before the softmax.
        coeff = float(self.layer_id + 1)
        q = q / (math.sqrt(self.head_dim) * coeff)
        out, row = [], 0
        for cache, start, T, mask in spans:
            keys, values = cache.store(layer, start, k[:, row:row + T], v[:, row:row + T])
            y = F.scaled_dot_product_attention(q[None, :, row:row + T], keys, values, attn_mask=mask, scale=coeff)
            out.append(y[0].transpose(0, 1).reshape(T, -1))
            row += T
        return linear(self.dense, out[0] if len(out) == 1 else torch.cat(out))


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.dense_4h_to_h, F.gelu(linear(self.dense_h_to_4h, x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.alpha = (2 * DEEPNORM_LAYERS) ** 0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int,
                spans: list[tuple[KVCache, int, int, Tensor | None]]) -> Tensor:
        # DeepNorm: the residual is the normalized input, scaled: f(LN(x)) + α·LN(x).
        x = self.input_layernorm(x)
        h = torch.add(self.attention(x, cos, sin, layer, spans), x, alpha=self.alpha)
        h = self.post_attention_layernorm(h)
        return torch.add(self.mlp(h), h, alpha=self.alpha)


class ChatGLMv1(SequenceVerbs):
    def __init__(self, config: GLMConfig):
        super().__init__()
        if config.version != 1:
            raise ValueError(f"ChatGLMv1 runs ChatGLM-6B configs, not version {config.version}")
        if config.head_dim % 4:
            raise ValueError(f"head_dim {config.head_dim} must split into 2-D rotary quarters")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_layers)),
            final_layernorm=nn.LayerNorm(config.hidden_size, eps=config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight   # tied: one tensor
        self.quantizable = [f"transformer.layers.{i}.{name}" for i in range(config.num_layers)
                            for name in ("attention.query_key_value", "attention.dense",
                                         "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
        self.output_layers: list[str] = []   # lm_head is the embedding table, quantized with it
        self.rotary: tuple[Tensor, Tensor] | None = None   # built on first use, where the weights live

    @property
    def device(self) -> torch.device:
        return self.transformer.final_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (quantized models keep an int8 embedding table: see checkpoint)."""
        return self.transformer.final_layernorm.weight.dtype

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_heads, c.head_dim, c.seq_length, self.dtype, self.device)

    def prepare(self, cache: KVCache, ids: list[int]) -> int:
        """Cut the cache back to the positions that stay exact for ids and set its layout; return how many are kept.
        Context K/V depend on the whole context (it is bidirectional), so the cache is reused only when ids keep
        its context and its <sop>; the last id always runs (its logits are the answer)."""
        cache.check(len(ids))
        layout = context_layout(ids, self.config)
        keep = 0
        if cache.ids and cache.layout == layout:
            common = common_prefix(cache.ids, ids)
            keep = min(common, len(ids) - 1) if common > layout[0] else 0
        cache.truncate(keep)
        cache.layout = layout
        return keep

    def first_chunk(self, cache: KVCache, ids: list[int]) -> int:
        """The fewest of ids the next run must take: the context and its <sop> in one run (bidirectional)."""
        return max(1, cache.layout[0] + 1 - len(cache.ids))

    def hidden(self, segments: list[Segment]) -> Tensor:
        """Final-normed hidden states [rows, hidden] of every segment's ids (each cache prepared for its prompt),
        their K/V stored in the cache after what it held."""
        device = self.device
        if self.rotary is None or self.rotary[0].device != device:
            self.rotary = rotary_table(self.config, device)
        cos_table, sin_table = self.rotary
        spans, positions, blocks = [], [], []
        for cache, ids in segments:
            if not ids:
                raise ValueError("a segment needs at least one id")
            if not cache.layout:
                raise RuntimeError("a ChatGLM-6B cache needs prepare() with its prompt first")
            cache.reserve(len(cache.ids) + len(ids))
            start, T, (context_length, mask_position) = len(cache.ids), len(ids), cache.layout
            pos, block = position_ids(start, T, context_length, mask_position, device)
            positions.append(pos)
            blocks.append(block)
            mask = None if T == 1 else attention_mask(start, T, context_length, device)   # one new id sees all
            spans.append((cache, start, T, mask))
        pos, block = torch.cat(positions), torch.cat(blocks)
        cos = torch.stack((cos_table[pos], cos_table[block]), dim=1)[:, None, :, None, :]
        sin = torch.stack((sin_table[pos], sin_table[block]), dim=1)[:, None, :, None, :]
        all_ids = [i for _, ids in segments for i in ids]
        x = self.transformer.word_embeddings(torch.tensor(all_ids, dtype=torch.long, device=device)).to(self.dtype)
        with attention_kernels(self.dtype, ATTENTION_BACKENDS):
            for i, layer in enumerate(self.transformer.layers):
                x = layer(x, cos, sin, i, spans)
        for cache, ids in segments:
            cache.ids += ids
        return self.transformer.final_layernorm(x)

    def output(self, hidden: Tensor) -> Tensor:
        return linear(self.lm_head, hidden)
