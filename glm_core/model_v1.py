"""ChatGLM-6B (v1) in plain PyTorch, numerically following the official THUDM/chatglm-6b modeling code.

What sets v1 apart from v2/v3: LayerNorm and tanh-GELU, DeepNorm residuals (`LN(x)·√(2L) + f(LN(x))`),
per-head interleaved qkv rows, 2-D rotary embeddings (first half of each head by position, second half by
block position) and a prefix-LM mask: everything before the first <sop> sees everything before it, the
rest is causal. The module tree mirrors the official parameter names, so a checkpoint loads by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import GLMConfig
from .model import check_length, linear   # check_length raises model.ContextOverflowError

CACHE_CHUNK = 256  # KV cache grows by this many positions at a time
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        T = x.shape[0]
        # Rows are per head [h0 q,k,v | h1 q,k,v | ...]; q and k are rotated in one go.
        qkv = linear(self.query_key_value, x).view(T, self.num_heads, 3, self.head_dim)
        qk = apply_rotary(qkv[:, :, :2].flatten(1, 2), cos, sin).view(T, self.num_heads, 2, self.head_dim)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))  # [1, heads, T, d]
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        # The official layer-wise scaling: q / (√d·(layer+1)), then scores·(layer+1) before the softmax.
        coeff = float(self.layer_id + 1)
        q = q / (math.sqrt(self.head_dim) * coeff)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=coeff)
        return linear(self.dense, y[0].transpose(0, 1).reshape(T, -1))


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        # DeepNorm: the residual is the normalized input, scaled: f(LN(x)) + α·LN(x).
        x = self.input_layernorm(x)
        h = torch.add(self.attention(x, cos, sin, mask, cache, start), x, alpha=self.alpha)
        h = self.post_attention_layernorm(h)
        return torch.add(self.mlp(h), h, alpha=self.alpha)


class ChatGLMv1(nn.Module):
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
        self.cached_ids: list[int] = []
        self.context_length = 0       # of the cached ids
        self.mask_position = 0        # of the cached ids
        self.kv_cache: Tensor | None = None   # [layers, 2, 1, heads, capacity, head_dim]
        self.rotary: tuple[Tensor, Tensor] | None = None   # built on first use, where the weights live

    @property
    def device(self) -> torch.device:
        return self.transformer.final_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (quantized models keep an int8 embedding table: see checkpoint)."""
        return self.transformer.final_layernorm.weight.dtype

    def hidden(self, ids: list[int], start: int, context_length: int, mask_position: int, use_cache: bool) -> Tensor:
        """Final-normed hidden states [len(ids), hidden] of ids placed at positions start..; with use_cache
        their K/V go into the cache after the start positions already there and attention reads all of it."""
        device, T = self.device, len(ids)
        if self.rotary is None or self.rotary[0].device != device:
            self.rotary = rotary_table(self.config, device)
        cos_table, sin_table = self.rotary
        pos, block = position_ids(start, T, context_length, mask_position, device)
        cos = torch.stack((cos_table[pos], cos_table[block]), dim=1)[:, None, :, None, :]
        sin = torch.stack((sin_table[pos], sin_table[block]), dim=1)[:, None, :, None, :]
        mask = None if T == 1 else attention_mask(start, T, context_length, device)   # one new id sees all
        x = self.transformer.word_embeddings(torch.tensor(ids, dtype=torch.long, device=device)).to(self.dtype)
        with sdpa_kernel(ATTENTION_BACKENDS):
            for i, layer in enumerate(self.transformer.layers):
                cache = (self.kv_cache[i, 0], self.kv_cache[i, 1]) if use_cache else None
                x = layer(x, cos, sin, mask, cache, start)
        return self.transformer.final_layernorm(x)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> Tensor:
        if not ids:
            raise ValueError("logits() needs at least one id")
        check_length(len(ids), self.config)
        context_length, mask_position = context_layout(ids, self.config)
        hidden = self.hidden(ids, 0, context_length, mask_position, use_cache=False)
        return linear(self.lm_head, hidden).float()

    def reusable_prefix(self, ids: list[int], context_length: int, mask_position: int) -> int:
        """How many cached positions stay exact for ids. Context K/V depend on the whole context
        (it is bidirectional), so the cache is reused only when ids keep its context and its <sop>."""
        if not self.cached_ids or (context_length, mask_position) != (self.context_length, self.mask_position):
            return 0
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        if common <= context_length:
            return 0
        return min(common, len(ids) - 1)   # the last id always runs: its logits are the answer

    def reserve(self, n: int) -> None:
        """Room for n cached positions, grown in whole chunks up to seq_length; kept K/V are copied over."""
        check_length(n, self.config)
        if self.kv_cache is not None and self.kv_cache.shape[4] >= n:
            return
        c = self.config
        capacity = min(c.seq_length, -(-n // CACHE_CHUNK) * CACHE_CHUNK)
        grown = torch.empty(c.num_layers, 2, 1, c.num_heads, capacity, c.head_dim, dtype=self.dtype, device=self.device)
        kept = len(self.cached_ids)
        if kept:
            grown[:, :, :, :, :kept] = self.kv_cache[:, :, :, :, :kept]
        self.kv_cache = grown

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Tensor:
        if not ids:
            raise ValueError("prefill() needs at least one id")
        context_length, mask_position = context_layout(ids, self.config)
        self.reserve(len(ids))
        keep = self.reusable_prefix(ids, context_length, mask_position)
        self.cached_ids = self.cached_ids[:keep]
        self.context_length, self.mask_position = context_length, mask_position
        hidden = self.hidden(ids[keep:], keep, context_length, mask_position, use_cache=True)
        self.cached_ids = list(ids)
        return linear(self.lm_head, hidden[-1:])[0].float()

    @torch.inference_mode()
    def decode_one_token(self, token: int) -> Tensor:
        if not self.cached_ids:
            raise RuntimeError("decode_one_token() needs a prefill() first")
        start = len(self.cached_ids)
        self.reserve(start + 1)
        hidden = self.hidden([token], start, self.context_length, self.mask_position, use_cache=True)
        self.cached_ids.append(token)
        return linear(self.lm_head, hidden)[0].float()

    def reset_cache(self) -> None:
        self.kv_cache = None
        self.cached_ids = []
        self.context_length = self.mask_position = 0
