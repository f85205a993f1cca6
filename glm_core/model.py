"""ChatGLM2-6B / ChatGLM3-6B in plain PyTorch, numerically following the official THUDM modeling code.

Pre-RMSNorm blocks, SwiGLU MLP, multi-query attention (kv_groups K/V heads shared by the query heads),
one blocked qkv projection `[Q | K | V]` with bias, rotary embeddings on the first half of each head dim
in interleaved pairs, an untied output layer. The module tree mirrors the official parameter names, so a
checkpoint loads by name. The KV cache is preallocated inside the model and reused across calls.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import GLMConfig
from .quant import slow_half_gemm

CACHE_CHUNK = 256           # KV cache grows by this many positions at a time
PREFILL_CHUNK = 512         # prompt ids run at a time: bounds activation memory on long prompts
UPCAST_ELEMENTS = 1 << 22   # weight elements converted to fp32 at a time by the CPU prefill path of `linear`


class ContextOverflowError(ValueError):
    """The ids do not fit in the context the model was trained for (config.seq_length)."""


def check_length(n: int, config: GLMConfig) -> None:
    if n > config.seq_length:
        raise ContextOverflowError(f"{n} tokens do not fit in the model's context of {config.seq_length}")


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x), except for a half-precision nn.Linear given several rows on a CPU with slow half GEMMs: there
    the weight is upcast to fp32 a slice at a time. Products are exact in fp32 and sums are fp32 either way,
    so only the rounding order differs."""
    if not (isinstance(layer, nn.Linear) and x.device.type == "cpu" and x.shape[0] > 1
            and slow_half_gemm(layer.weight.dtype)):
        return layer(x)
    weight = layer.weight
    step = max(1, UPCAST_ELEMENTS // weight.shape[1])
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    rows = torch.empty(min(step, weight.shape[0]), weight.shape[1], dtype=torch.float32)
    for i in range(0, weight.shape[0], step):
        w = rows[: min(step, weight.shape[0] - i)]
        w.copy_(weight[i : i + step])
        torch.mm(x32, w.t(), out=out[:, i : i + w.shape[0]])
    if layer.bias is not None:
        out += layer.bias
    return out.to(x.dtype)


def rotary(config: GLMConfig, start: int, length: int, dtype: torch.dtype,
           device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin [length, 1, head_dim/4] for positions start..start+length-1, in the compute dtype as the
    official cache is. Long-context variants differ by version: ChatGLM2-32k interpolates positions
    (position / rope_ratio), ChatGLM3-32k/128k raise the base (10000 * rope_ratio)."""
    dim = config.head_dim // 2
    base = 10000.0 * config.rope_ratio if config.version == 3 else 10000.0
    theta = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
    if config.version == 2:
        positions = positions / config.rope_ratio
    angles = torch.outer(positions, theta)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim]: rotate the first head_dim/2 dims in interleaved pairs (2i, 2i+1)."""
    n = 2 * cos.shape[-1]
    pairs = x[..., :n].unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., n:]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads, self.kv_groups, self.head_dim = config.num_heads, config.kv_groups, config.head_dim
        qkv_rows = (config.num_heads + 2 * config.kv_groups) * config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_rows, bias=config.qkv_bias)
        self.dense = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        """x [T, hidden] at positions start..; cache (k, v) [kv_groups, capacity, head_dim] holds 0..start-1."""
        T, H, G, D = x.shape[0], self.num_heads, self.kv_groups, self.head_dim
        q, k, v = linear(self.query_key_value, x).split([H * D, G * D, G * D], dim=-1)
        # [1, heads, T, D]: SDPA takes its fused CPU kernel only for 4-D inputs
        q = apply_rotary(q.view(T, H, D), cos, sin).transpose(0, 1)[None]
        k = apply_rotary(k.view(T, G, D), cos, sin).transpose(0, 1)[None]
        v = v.view(T, G, D).transpose(0, 1)[None]
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, start : start + T] = k[0]
            v_cache[:, start : start + T] = v[0]
            k, v = k_cache[None, :, : start + T], v_cache[None, :, : start + T]
        if T == 1:
            # One new token sees every cached one, so the query heads of a group can be stacked as rows:
            # no mask and no K/V copies per head.
            out = F.scaled_dot_product_attention(q.reshape(1, G, H // G, D), k, v).reshape(1, H, 1, D)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # is_causal aligns the mask top-left; with a cached prefix row i sees keys 0..start+i.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return linear(self.dense, out[0].transpose(0, 1).reshape(T, H * D))


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(self.dense_h_to_4h, x).chunk(2, dim=-1)
        return linear(self.dense_4h_to_h, F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChatGLM(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            embedding=nn.ModuleDict(dict(word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size))),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers)),
                final_layernorm=RMSNorm(config.hidden_size, config.norm_eps),
            )),
            output_layer=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        ))
        self.quantizable = [f"transformer.encoder.layers.{i}.{name}" for i in range(config.num_layers)
                            for name in ("self_attention.query_key_value", "self_attention.dense",
                                         "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
        self.output_layers = ["transformer.output_layer"]   # quantized too when quantizing from full precision
        self.kv_cache: Tensor | None = None     # [num_layers, 2, kv_groups, capacity, head_dim]
        self.cached_ids: list[int] = []

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (quantized models keep an int8 embedding table: see checkpoint)."""
        return self.transformer.encoder.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.encoder.final_layernorm.weight.device

    def hidden(self, ids: list[int], start: int, use_cache: bool) -> Tensor:
        """Final-normed hidden states [len(ids), hidden] of ids placed at positions start.."""
        x = self.transformer.embedding.word_embeddings(torch.tensor(ids, device=self.device)).to(self.dtype)
        cos, sin = rotary(self.config, start, len(ids), self.dtype, self.device)
        for i, layer in enumerate(self.transformer.encoder.layers):
            cache = (self.kv_cache[i, 0], self.kv_cache[i, 1]) if use_cache else None
            x = layer(x, cos, sin, cache, start)
        return self.transformer.encoder.final_layernorm(x)

    def reserve(self, n: int) -> None:
        """Make room for n cached positions, growing by whole chunks up to seq_length."""
        check_length(n, self.config)
        capacity = 0 if self.kv_cache is None else self.kv_cache.shape[3]
        if n <= capacity:
            return
        c = self.config
        capacity = min(c.seq_length, -(-n // CACHE_CHUNK) * CACHE_CHUNK)
        grown = torch.empty(c.num_layers, 2, c.kv_groups, capacity, c.head_dim, dtype=self.dtype, device=self.device)
        kept = len(self.cached_ids)
        if kept:
            grown[:, :, :, :kept] = self.kv_cache[:, :, :, :kept]
        self.kv_cache = grown

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> Tensor:
        check_length(len(ids), self.config)
        return linear(self.transformer.output_layer, self.hidden(ids, 0, use_cache=False)).float()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Tensor:
        if not ids:
            raise ValueError("prefill needs at least one id")
        self.reserve(len(ids))
        keep = 0
        for cached, new in zip(self.cached_ids, ids[:-1]):     # the last id always runs: its logits are the answer
            if cached != new:
                break
            keep += 1
        self.cached_ids = self.cached_ids[:keep]
        for start in range(keep, len(ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            hidden = self.hidden(chunk, start, use_cache=True)
            self.cached_ids += chunk
        return linear(self.transformer.output_layer, hidden[-1:])[0].float()

    @torch.inference_mode()
    def decode_one_token(self, token: int) -> Tensor:
        start = len(self.cached_ids)
        self.reserve(start + 1)
        hidden = self.hidden([token], start, use_cache=True)
        self.cached_ids.append(token)
        return linear(self.transformer.output_layer, hidden)[0].float()

    def reset_cache(self) -> None:
        self.kv_cache = None
        self.cached_ids = []
