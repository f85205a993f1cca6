"""Batchers: several sequences through one model at once, joining and leaving between steps.

A batcher owns the KV caches of the sequences it runs. Its three verbs, used by the generation loop
(generate.generate, one sequence) and the model service (service.ModelService, many):
- `open(ids, key)`: a sequence for prompt ids. A cache kept from a finished sequence whose ids share a prefix
  with these (the previous turn of the same conversation) is reused: only the new ids run.
- `step(prefill, decode)`: one forward. `decode` gives each running sequence its next token; `prefill` (at most
  one) runs the next chunk of its pending prompt ids in the same step, so running streams keep moving while a new
  prompt is read. Returns the logits of every sequence that got one: each decoded one, and the prefilled one when
  its prompt is done.
- `close(seq, keep)`: the sequence is finished; with keep its cache is kept (up to `max_kept`, least recently
  used dropped) for a later prompt that shares its prefix. `clear(key)` drops kept caches.

Two kinds: NativeBatcher for the ChatGLM models of this package (a KVCache per sequence, every linear over all
rows at once, attention per sequence), PaddedBatcher for transformers models (one left-padded batch cache
stepped with attention_mask and position_ids; a new prompt is read on a cache of its own, then spliced in).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .kvcache import KVCache, common_prefix

PREFILL_CHUNK = 512        # prompt ids per step when nobody else is decoding: big GEMMs, few passes over the weights
SHARED_PREFILL_CHUNK = 64  # prompt ids per step beside running streams: a step costs them at most this much prefill
MAX_KEPT = 4               # finished sequences' caches kept for their next turn


@dataclass(eq=False)
class Sequence:
    """One prompt and what the batcher knows of it: `pending` prompt ids not yet run."""
    key: str | None
    pending: list[int]
    cache: object = None
    id: int = field(default_factory=itertools.count().__next__)


class Batcher:
    """What NativeBatcher and PaddedBatcher share: the kept caches and the prefill chunk."""

    def __init__(self, max_kept: int = MAX_KEPT):
        self.max_kept = max_kept
        self.kept: list[tuple[str | None, object]] = []   # (key, cache), least recently used first

    def chunk(self, seq: Sequence, decoding: int) -> int:
        return PREFILL_CHUNK if decoding == 0 else SHARED_PREFILL_CHUNK

    def take_kept(self, ids: list[int], key: str | None, cached_ids) -> object | None:
        """The kept cache to continue for ids, removed from the kept list: the one sharing the longest prefix among
        those of the same key, or whose ids are mostly (half or more) a prefix of these: a later turn of the same
        conversation. A few shared leading ids (a chat template's, a system prompt) are no reason to take another
        conversation's cache. None when no cache qualifies."""
        best, best_shared = None, 0
        for i, (k, cache) in enumerate(self.kept):
            cached = cached_ids(cache)
            shared = common_prefix(cached, ids)
            if shared > best_shared and ((key is not None and k == key) or 2 * shared >= len(cached)):
                best, best_shared = i, shared
        return None if best is None else self.kept.pop(best)[1]

    def keep(self, key: str | None, cache: object) -> None:
        self.kept.append((key, cache))
        while len(self.kept) > self.max_kept:
            self.kept.pop(0)

    def clear(self, key: str | None = None) -> None:
        """Drop the kept caches: all, or those of one key (a conversation cleared or deleted)."""
        self.kept = [(k, c) for k, c in self.kept if key is not None and k != key]


class NativeBatcher(Batcher):
    """ChatGLM (v1, v2, v3) models: `model.forward(segments)` over a KVCache per sequence. `graphed`: decode steps
    replay a CUDA graph (cuda_graphs.GraphedDecode), a sequence at a time, instead of running eagerly."""

    def __init__(self, model, max_kept: int = MAX_KEPT, graphed=None):
        super().__init__(max_kept)
        self.model = model
        self.graphed = graphed

    def open(self, ids: list[int], key: str | None = None) -> Sequence:
        if not ids:
            raise ValueError("a prompt needs at least one id")
        cache = self.take_kept(ids, key, lambda c: c.ids) or self.model.new_cache()
        keep = self.model.prepare(cache, ids)
        return Sequence(key, list(ids[keep:]), cache)

    def step(self, prefill: Sequence | None, decode: list[tuple[Sequence, int]]) -> dict[Sequence, Tensor]:
        if self.graphed is not None and prefill is None:
            # one replayed step per sequence beats one eager step for all on a GPU, where eager steps are bound by
            # launching kernels from Python (H100, ChatGLM2-6B bf16: 4 streams 36 tok/s eager, 1 stream 106 graphed)
            return {seq: self.graphed(seq.cache, token) for seq, token in decode}
        segments = [(seq.cache, [token]) for seq, token in decode]
        if prefill is not None:
            n = max(self.chunk(prefill, len(decode)), self.model.first_chunk(prefill.cache, prefill.pending))
            segments.append((prefill.cache, prefill.pending[:n]))
        logits = self.model.forward(segments)
        out = {seq: logits[i] for i, (seq, _) in enumerate(decode)}
        if prefill is not None:
            del prefill.pending[:n]
            if not prefill.pending:
                out[prefill] = logits[-1]
        return out

    def close(self, seq: Sequence, keep: bool = True) -> None:
        if keep and seq.cache.ids:
            self.keep(seq.key, seq.cache)


@dataclass(eq=False)
class _Row:
    """A sequence of the padded batch: its ids (those whose K/V are in the cache)."""
    seq: Sequence
    ids: list[int]


class PaddedBatcher(Batcher):
    """transformers causal LMs through their public forward: the running sequences are the rows of one
    DynamicCache (growing_cache's: positions written in place), left-padded to a common length, stepped together
    with an attention mask and position ids. A new prompt runs on a cache of its own (in chunks) and is spliced in
    when it is done; a finished row is cut out and, kept, becomes a cache of its own again (its padding dropped)."""

    def __init__(self, hf_model, max_kept: int = MAX_KEPT):
        super().__init__(max_kept)
        self.hf = hf_model
        self.device = next(hf_model.parameters()).device
        self.rows: list[_Row] = []
        self.cache = None            # the batch's DynamicCache: layers of [rows, kv_heads, length, head_dim]
        self.mask: Tensor | None = None   # [rows, length] 1 = a real position, 0 = left padding

    def _new_cache(self):
        from .growing_cache import growing_cache
        return growing_cache(self.hf.config)

    def open(self, ids: list[int], key: str | None = None) -> Sequence:
        if not ids:
            raise ValueError("a prompt needs at least one id")
        kept = self.take_kept(ids, key, lambda c: c[1])
        if kept is None:
            return Sequence(key, list(ids), (self._new_cache(), []))
        cache, cached = kept
        keep = min(common_prefix(cached, ids), len(ids) - 1)   # the last id always runs: its logits are the answer
        if keep < len(cached):
            cache.crop(keep - len(cached))
        return Sequence(key, list(ids[keep:]), (cache, cached[:keep]))

    def step(self, prefill: Sequence | None, decode: list[tuple[Sequence, int]]) -> dict[Sequence, Tensor]:
        out: dict[Sequence, Tensor] = {}
        if decode:
            tokens = dict((seq.id, token) for seq, token in decode)
            if sorted(tokens) != sorted(row.seq.id for row in self.rows):
                raise RuntimeError("every row of the padded batch decodes at each step")
            ids = torch.tensor([[tokens[row.seq.id]] for row in self.rows], device=self.device)
            positions = torch.tensor([[len(row.ids)] for row in self.rows], device=self.device)
            mask = F.pad(self.mask, (0, 1), value=1)
            result = self.hf(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            self.mask = mask
            for i, row in enumerate(self.rows):
                row.ids.append(tokens[row.seq.id])
                out[row.seq] = result.logits[i, -1].float()
        if prefill is not None:
            cache, cached = prefill.cache
            n = self.chunk(prefill, len(decode))
            chunk = prefill.pending[:n]
            result = self.hf(input_ids=torch.tensor([chunk], device=self.device), past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            cached.extend(chunk)
            del prefill.pending[:n]
            if not prefill.pending:
                out[prefill] = result.logits[0, -1].float()
                self._splice(prefill)
        return out

    def _splice(self, seq: Sequence) -> None:
        """Add a sequence whose prompt is done to the batch as a new row, left-padding the shorter side."""
        cache, ids = seq.cache
        seq.cache = None
        row_mask = torch.ones(1, len(ids), dtype=torch.long, device=self.device)
        if not self.rows:
            self.cache, self.mask, self.rows = cache, row_mask, [_Row(seq, ids)]
            return
        have, new = self.mask.shape[1], len(ids)
        length = max(have, new)
        for batch_layer, layer in zip(self.cache.layers, cache.layers):
            batch_layer.keys = torch.cat([_left_pad(batch_layer.keys, length - have), _left_pad(layer.keys, length - new)])
            batch_layer.values = torch.cat([_left_pad(batch_layer.values, length - have),
                                            _left_pad(layer.values, length - new)])
        self.mask = torch.cat([F.pad(self.mask, (length - have, 0)), F.pad(row_mask, (length - new, 0))])
        self.rows.append(_Row(seq, ids))

    def close(self, seq: Sequence, keep: bool = True) -> None:
        index = next((i for i, row in enumerate(self.rows) if row.seq is seq), None)
        if index is None:    # still reading its prompt: its own cache
            if keep and seq.cache is not None and seq.cache[1]:
                self.keep(seq.key, seq.cache)
            return
        row = self.rows.pop(index)
        pad = int((self.mask[index] == 0).sum())
        if keep:
            cache = self._new_cache()
            for i, layer in enumerate(self.cache.layers):   # the row without its padding, as a cache of its own
                cache.update(layer.keys[index:index + 1, :, pad:].clone(), layer.values[index:index + 1, :, pad:].clone(), i)
            self.keep(seq.key, (cache, row.ids))
        if not self.rows:
            self.cache = self.mask = None
            return
        rest = torch.tensor([i for i in range(len(self.rows) + 1) if i != index], device=self.device)
        self.mask = self.mask[rest]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())   # columns that are padding in every row
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rest, :, lead:], layer.values[rest, :, lead:]
        self.mask = self.mask[:, lead:]


def _left_pad(x: Tensor, n: int) -> Tensor:
    """x [rows, heads, length, dim] with n zero positions in front."""
    return F.pad(x, (0, 0, n, 0)) if n else x
