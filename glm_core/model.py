"""ChatGLM2-6B / ChatGLM3-6B in plain PyTorch, numerically following the official THUDM modeling code.

Pre-RMSNorm blocks, SwiGLU MLP, multi-query attention (kv_groups K/V heads shared by the query heads),
one blocked qkv projection `[Q | K | V]` with bias, rotary embeddings on the first half of each head dim
in interleaved pairs, an untied output layer. The module tree mirrors the official parameter names, so a
checkpoint loads by name.

`forward(segments)` runs several sequences at once: each segment is a KVCache and the ids that follow what it
holds. Every linear takes the rows of all segments together (the weights are read once per step, whatever the
batch); attention runs per segment against its own cache. The single-sequence verbs (`prefill`,
`decode_one_token`, `logits`) are that with one segment and the model's own cache.
"""
from __future__ import annotations

import functools
import itertools
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import GLMConfig
from .kvcache import KVCache, common_prefix
from . import native
from .quant import matmul_fp32, native_bf16_linear, slow_half_gemm

PREFILL_CHUNK = 512         # prompt ids run at a time: bounds activation memory on long prompts
UPCAST_ELEMENTS = 1 << 22   # weight elements converted to fp32 at a time by the CPU prefill path of `linear`

Segment = tuple[KVCache, list[int]]   # a sequence's cache and the ids to run after what it holds


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x), except for a half-precision nn.Linear given several rows on a CPU with slow half GEMMs: there
    the weight is upcast to fp32 a slice at a time. Products are exact in fp32 and sums are fp32 either way,
    so only the rounding order differs. A bf16 weight takes native's products where native.takes_bf16 says so (on an
    AVX2 CPU any number of rows, with AVX-512 bf16 decode rows)."""
    if isinstance(layer, nn.Linear) and (y := native_bf16_linear(layer, x)) is not None:
        return y
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
        out[:, i : i + w.shape[0]] = matmul_fp32(x32, w)
    if layer.bias is not None:
        out += layer.bias
    return out.to(x.dtype)


def rotary(config: GLMConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [len(positions), 1, head_dim/4] in the compute dtype, as the official cache is. Long-context
    variants differ by version: ChatGLM2-32k interpolates positions (position / rope_ratio), ChatGLM3-32k/128k
    raise the base (10000 * rope_ratio)."""
    dim = config.head_dim // 2
    base = 10000.0 * config.rope_ratio if config.version == 3 else 10000.0
    theta = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    positions = positions.to(torch.float32)
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
    round_first = False   # transformers' Llama rounds the normalized x to its dtype before the weight multiplies it

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if native.takes_rms_norm(x, self.weight):
            return native.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.round_first:
            return self.weight * x32.to(x.dtype)
        return (self.weight * x32).to(x.dtype)


Rotate = Callable[[Tensor, Tensor, Tensor], Tensor]   # (x [rows, heads, D], cos, sin) -> x with positions applied


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, rotate: Rotate = apply_rotary):
        super().__init__()
        self.num_heads, self.kv_groups, self.head_dim = config.num_heads, config.kv_groups, config.head_dim
        self.rotate = rotate
        qkv_rows = (config.num_heads + 2 * config.kv_groups) * config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_rows, bias=config.qkv_bias)
        self.dense = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """x [rows, hidden]; `attend(q, k, v)` ([heads, rows, D], [kv_groups, rows, D] x 2) stores the keys and
        values and returns the attention output [rows, heads * D]: per segment (SegmentAttention) or on a
        full-length cache at a position held in a tensor (attend_at, for CUDA graphs)."""
        H, G, D = self.num_heads, self.kv_groups, self.head_dim
        rows = x.shape[0]
        qkv = linear(self.query_key_value, x).view(rows, H + 2 * G, D)
        # queries and keys are adjacent heads of the product: rotated together, half the ops of a decode step's rotary
        qk = self.rotate(qkv[:, :H + G], cos, sin).transpose(0, 1)   # [heads, rows, D]
        return linear(self.dense, attend(qk[:H], qk[H:], qkv[:, H + G:].transpose(0, 1)))


def attend_one(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """One new token against cached keys/values [1, G, L, D]: the query heads of a group stacked as rows (no K/V
    copies per head); [1, heads * D]."""
    H, _, D = q.shape
    G = keys.shape[1]
    o = F.scaled_dot_product_attention(q.reshape(1, G, H // G, D), keys, values)
    return o.reshape(1, H * D)


@functools.cache
def flash_attention_fails(dtype: torch.dtype) -> bool:
    """torch 2.13's CPU flash attention takes its AMX route for bf16 whenever the CPU has AMX, and from 64 query rows
    raises "pack_vnni2 is only supported when avx512 is supported" where torch is held below its AVX-512 path
    (ATEN_CPU_CAPABILITY=avx2 or default, the paths the tests exercise on such a CPU)."""
    return (dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
            and torch.backends.cpu.get_cpu_capability() != "AVX512")


def attention_kernels(dtype: torch.dtype, backends: list[SDPBackend] | None = None) -> AbstractContextManager:
    """The scaled_dot_product_attention kernels a forward pass may use: the math kernel alone where
    flash_attention_fails, else `backends` (None: torch's choice)."""
    if flash_attention_fails(dtype):
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext() if backends is None else sdpa_kernel(backends)


class SegmentAttention:
    """Attention for one forward pass over segments: spans (cache, start, length) in row order, a segment's rows at
    positions start.. after the start positions its cache holds; called per layer as (layer, q, k, v). What every
    layer needs of the segments is worked out on the first: the one-row segments (decode steps) attend together
    through native.decode_attention where it takes them (fp32 on CPU; it stores their keys and values too), else one
    by one; longer ones through scaled_dot_product_attention."""

    def __init__(self, spans: list[tuple[KVCache, int, int]]):
        self.spans = spans
        first_rows = itertools.accumulate((T for _, _, T in spans), initial=0)
        self.decoding = [(index, row) for index, (row, (_, _, T)) in enumerate(zip(first_rows, spans))
                         if T == 1]   # (span index, its row) of the one-row segments
        self.planned = False
        self.native_plan: Tensor | None = None   # native.decode_attention_plan of the decoding spans, if it takes them
        self.native_rows: Tensor | None = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [heads, rows, D], k and v [kv_groups, rows, D] -> [rows, heads * D]; keys and values stored."""
        if not self.planned:
            self.planned = True
            tensors = [self.spans[index][0].tensor for index, _ in self.decoding]
            if tensors and native.takes_decode_attention(q, k, v, tensors):
                self.native_plan = native.decode_attention_plan(
                    tensors, [self.spans[index][1] + 1 for index, _ in self.decoding])
                self.native_rows = torch.tensor([row for _, row in self.decoding], dtype=torch.int64)
        out, row = [], 0
        for cache, start, T in self.spans:
            if T == 1 and self.native_plan is not None:
                out.append(None)   # filled in below
            else:
                keys, values = cache.store(layer, start, k[:, row:row + T], v[:, row:row + T])
                out.append(attend_rows(q[:, row:row + T], keys, values, start))
            row += T
        if self.native_plan is not None:
            together = native.decode_attention(self.native_plan[layer], self.native_rows, q, k, v)
            if len(out) == 1:
                return together
            for i, (index, _) in enumerate(self.decoding):
                out[index] = together[i:i + 1]
        return out[0] if len(out) == 1 else torch.cat(out)


def attend_rows(q: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
    """A segment's T rows q [heads, T, D] at positions start.. against its cached keys and values [1, G, start + T, D]
    (theirs stored); [T, heads * D]."""
    H, T, D = q.shape
    if T == 1:
        return attend_one(q, keys, values)
    qs = q[None]   # [1, heads, T, D]: SDPA takes its fused CPU kernel only for 4-D inputs
    if start == 0:
        o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=True)
    else:   # is_causal aligns the mask top-left; with a cached prefix row i sees keys 0..start+i
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(T, H * D)


def attend_at(layer: int, cache: KVCache, position: Tensor, visible: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One token at `position` (a tensor) on a cache allocated to its full length: stored with index_copy_ and
    attending to the positions `visible` marks, so nothing depends on Python ints (a CUDA graph replays it).
    Scores, softmax and sum are written out rather than left to a fused attention kernel: those parallelize over
    heads and query rows (2 key groups x 16 rows here), which used 2 of an H100's 132 SMs for 0.6 ms a layer over
    32k positions, where two matrix products spread over the whole GPU."""
    keys, values = cache.tensor[layer, 0], cache.tensor[layer, 1]
    keys.index_copy_(1, position, k)
    values.index_copy_(1, position, v)
    H, _, D = q.shape
    G = keys.shape[0]
    scores = torch.matmul(q.reshape(G, H // G, D), keys.transpose(1, 2)).float() * D ** -0.5   # [G, H/G, capacity]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(1, H * D)


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(self.dense_h_to_4h, x).chunk(2, dim=-1)
        return linear(self.dense_4h_to_h, F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, rotate: Rotate = apply_rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attention = SelfAttention(config, rotate)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class SequenceVerbs(nn.Module):
    """The verbs every native model offers over its `hidden(segments)` and `output(hidden)`: `forward` (the logits
    of each segment's last id), `logits` of every id of one sequence, and the single-sequence `prefill` /
    `decode_one_token` on a cache of the model's own. A model also gives `new_cache`, `prepare(cache, ids)` (cut a
    cache back to what stays exact for ids) and `first_chunk` (the fewest ids the next run must take)."""

    cache: KVCache | None = None   # the single-sequence verbs' own

    @property
    def cached_ids(self) -> list[int]:
        return self.cache.ids if self.cache is not None else []

    @torch.inference_mode()
    def forward(self, segments: list[Segment]) -> Tensor:
        """Logits [len(segments), output rows] (float32) of the last id of each segment."""
        hidden = self.hidden(segments)
        last = torch.tensor([len(ids) for _, ids in segments]).cumsum(0) - 1
        return self.output(hidden[last.to(hidden.device)]).float()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> Tensor:
        """Logits [len(ids), output rows] of every position of ids alone (a cache of their own, dropped after)."""
        if not ids:
            raise ValueError("logits() needs at least one id")
        cache = self.new_cache()
        self.prepare(cache, ids)
        return self.output(self.hidden([(cache, ids)])).float()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Tensor:
        """Run ids on the model's own cache, reusing what it holds of them; the logits after the last one."""
        if not ids:
            raise ValueError("prefill() needs at least one id")
        self.cache = self.cache or self.new_cache()
        pending = ids[self.prepare(self.cache, ids):]
        while pending:
            n = max(PREFILL_CHUNK, self.first_chunk(self.cache, pending))
            logits = self.forward([(self.cache, pending[:n])])
            pending = pending[n:]
        return logits[0]

    @torch.inference_mode()
    def decode_one_token(self, token: int) -> Tensor:
        if not self.cached_ids:
            raise RuntimeError("decode_one_token() needs a prefill() first")
        return self.forward([(self.cache, [token])])[0]

    def reset_cache(self) -> None:
        self.cache = None


class ChatGLM(SequenceVerbs):
    def __init__(self, config: GLMConfig, rotate: Rotate = apply_rotary):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            embedding=nn.ModuleDict(dict(word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size))),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(GLMBlock(config, rotate) for _ in range(config.num_layers)),
                final_layernorm=RMSNorm(config.hidden_size, config.norm_eps),
            )),
            output_layer=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        ))
        self.quantizable = [f"transformer.encoder.layers.{i}.{name}" for i in range(config.num_layers)
                            for name in ("self_attention.query_key_value", "self_attention.dense",
                                         "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
        self.output_layers = ["transformer.output_layer"]   # quantized too when quantizing from full precision

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (quantized models keep an int8 embedding table: see checkpoint)."""
        return self.transformer.encoder.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.encoder.final_layernorm.weight.device

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.kv_groups, c.head_dim, c.seq_length, self.dtype, self.device)

    def prepare(self, cache: KVCache, ids: list[int]) -> int:
        """Cut the cache back to the positions that stay exact for ids (their common prefix; the last id always runs,
        its logits are the answer) and return how many are kept."""
        cache.check(len(ids))
        keep = min(common_prefix(cache.ids, ids), len(ids) - 1)
        cache.truncate(keep)
        return keep

    def first_chunk(self, cache: KVCache, ids: list[int]) -> int:
        """Any chunking of a causal prompt is exact."""
        return 1

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin for the rows at these positions, as `rotate` takes them."""
        return rotary(self.config, positions, self.dtype)

    def hidden(self, segments: list[Segment]) -> Tensor:
        """Final-normed hidden states [rows, hidden] of every segment's ids, their keys and values stored in the
        segment's cache after what it held (which then holds them too)."""
        for cache, ids in segments:
            if not ids:
                raise ValueError("a segment needs at least one id")
            cache.reserve(len(cache.ids) + len(ids))
        spans = [(cache, len(cache.ids), len(ids)) for cache, ids in segments]
        all_ids = [i for _, ids in segments for i in ids]
        positions = torch.cat([torch.arange(start, start + T) for _, start, T in spans]).to(self.device)
        x = self.transformer.embedding.word_embeddings(torch.tensor(all_ids, device=self.device)).to(self.dtype)
        x = self.layers(x, *self.rope(positions), spans)
        for cache, ids in segments:
            cache.ids += ids
        return self.transformer.encoder.final_layernorm(x)

    def layers(self, x: Tensor, cos: Tensor, sin: Tensor, spans: list[tuple[KVCache, int, int]]) -> Tensor:
        """x [rows, hidden] through every layer, the spans' (cache, start, length) keys and values stored."""
        attention = SegmentAttention(spans)
        with attention_kernels(self.dtype):
            for i, layer in enumerate(self.transformer.encoder.layers):
                x = layer(x, cos, sin, partial(attention, i))
        return x

    @torch.inference_mode()
    def decode_at(self, cache: KVCache, token: Tensor, position: Tensor) -> Tensor:
        """Logits [1, output rows] of one token (a [1] tensor) at `position` (a [1] tensor) on a cache allocated to
        its full length (cache.reserve_full()); the caller appends the token to cache.ids. Every shape
        and address is fixed, so a CUDA graph can capture it (cuda_graphs.GraphedDecode)."""
        x = self.transformer.embedding.word_embeddings(token).to(self.dtype)
        cos, sin = self.rope(position)
        visible = (torch.arange(cache.capacity, device=self.device) <= position)[None, None]
        for i, layer in enumerate(self.transformer.encoder.layers):
            x = layer(x, cos, sin, partial(attend_at, i, cache, position, visible))
        return self.output(self.transformer.encoder.final_layernorm(x)).float()

    def output(self, hidden: Tensor) -> Tensor:
        return linear(self.transformer.output_layer, hidden)
