"""transformers' DynamicCache with layers that write new positions in place.

transformers' DynamicLayer concatenates on every update: each decode step copies the layer's whole cache into a
fresh tensor, so a step's cost grows with the conversation. The embedded model (then run through transformers) on a
2-core AMX Xeon, after a prompt of 4000 tokens, decoded 12.5-12.7 tok/s (int4) and 11.2-11.8 (fp32) with those
copies, 18.3-18.6 and 14.4-14.9 without (BENCHMARKS.md); after 32 tokens the same within noise. GrowingLayer keeps
room in whole chunks of KV_GROWTH positions and writes into it. `keys` and `values` stay what transformers and
batch.PaddedBatcher read and assign: the written positions (a view of the room). One assigned from outside (a splice,
a crop, a row cut out) becomes the layer's content, moved into new room at the next update.
"""
from __future__ import annotations

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .kvcache import CHUNK as KV_GROWTH   # room grows as the native models' KVCache grows: whole chunks of positions


class GrowingLayer(DynamicLayer):
    _keys = _values = None
    _room_keys = _room_values = None   # [rows, heads, capacity, dim]; None after `keys` / `values` were assigned

    @property
    def keys(self) -> Tensor | None:
        return self._keys

    @keys.setter
    def keys(self, tensor: Tensor | None) -> None:
        self._keys, self._room_keys = tensor, None

    @property
    def values(self) -> Tensor | None:
        return self._values

    @values.setter
    def values(self, tensor: Tensor | None) -> None:
        self._values, self._room_values = tensor, None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self._keys.shape[-2], key_states.shape[-2]
        if self._room_keys is None or self._room_values is None or length + new > self._room_keys.shape[-2]:
            capacity = -(-(length + new) // KV_GROWTH) * KV_GROWTH
            self._room_keys = _room(self._keys, key_states, capacity)
            self._room_values = _room(self._values, value_states, capacity)
        self._room_keys.narrow(-2, length, new).copy_(key_states)
        self._room_values.narrow(-2, length, new).copy_(value_states)
        self._keys = self._room_keys.narrow(-2, 0, length + new)
        self._values = self._room_values.narrow(-2, 0, length + new)
        return self._keys, self._values


def _room(old: Tensor, states: Tensor, capacity: int) -> Tensor:
    """[rows, heads, capacity, dim] of states' dtype, holding old's positions first."""
    room = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
    room.narrow(-2, 0, old.shape[-2]).copy_(old)
    return room


def growing_cache(config) -> DynamicCache:
    """A DynamicCache for a model of this config whose full-attention layers are GrowingLayers (sliding-window and
    other special layers stay transformers' own)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:   # a config without layer types: layers made as used
        cache.layer_class_to_replicate = GrowingLayer
    return cache
