"""KVCache: the keys and values of one sequence, for every layer of a native model.

One tensor [layers, 2, kv_heads, capacity, head_dim] and the ids whose keys and values it holds (positions
0..len(ids)-1). Capacity grows CHUNK positions at a time up to the model's context, so a short chat holds little
memory; kept positions are copied over when it grows. A batch is a list of these, one per sequence: each sequence
grows, is cut back to a shared prefix, or is dropped on its own.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 256   # positions added at a time


class ContextOverflowError(ValueError):
    """The ids do not fit in the context the model was trained for (config.seq_length)."""


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device):
        self.shape = (num_layers, 2, kv_heads, 0, head_dim)
        self.max_length, self.dtype, self.device = max_length, dtype, device
        self.tensor: Tensor | None = None
        self.ids: list[int] = []
        self.layout: tuple[int, ...] = ()   # what a model needs to know of the ids beyond them (ChatGLM-6B: its
                                            # context length and mask position); set by the model

    @property
    def capacity(self) -> int:
        return 0 if self.tensor is None else self.tensor.shape[3]

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.nbytes

    def check(self, n: int) -> None:
        if n > self.max_length:
            raise ContextOverflowError(f"{n} tokens do not fit in the model's context of {self.max_length}")

    def reserve(self, n: int) -> None:
        """Room for n positions, growing by whole chunks up to max_length."""
        self.check(n)
        if n <= self.capacity:
            return
        layers, two, heads, _, head_dim = self.shape
        capacity = min(self.max_length, -(-n // CHUNK) * CHUNK)
        grown = torch.empty(layers, two, heads, capacity, head_dim, dtype=self.dtype, device=self.device)
        kept = len(self.ids)
        if kept:
            grown[:, :, :, :kept] = self.tensor[:, :, :, :kept]
        self.tensor = grown

    def reserve_full(self) -> None:
        """Room for the whole context, the positions not written yet zeroed: a step that reads every position
        (ChatGLM.decode_at) weighs the masked ones by 0, and 0 times uninitialized memory can be NaN."""
        self.reserve(self.max_length)
        self.tensor[:, :, :, len(self.ids):].zero_()

    def store(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [kv_heads, T, head_dim] at positions start..start+T-1 of a layer (reserved beforehand); return
        the keys and values of positions 0..start+T-1, [1, kv_heads, start+T, head_dim] views."""
        end = start + k.shape[1]
        keys, values = self.tensor[layer, 0], self.tensor[layer, 1]
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys[None, :, :end], values[None, :, :end]

    def truncate(self, n: int) -> None:
        """Keep the first n positions (the rest is overwritten by what comes next)."""
        del self.ids[n:]

    def clear(self) -> None:
        """Forget everything and give the memory back."""
        self.tensor, self.ids, self.layout = None, [], ()


def common_prefix(cached: list[int], ids: list[int]) -> int:
    """How many leading ids two lists share."""
    n = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        n += 1
    return n
