"""A CUDA graph for the decode step of a lone sequence (ChatGLM2/3 and the Llama family on their blocks, on CUDA).

Eager decoding on a GPU is bound by launching kernels one by one from Python (a few hundred per token for 28
layers): the GPU waits for the CPU. A CUDA graph records a whole step once and replays it with one launch. It
needs every shape and address fixed, so the graph works on one full-length cache tensor of its own, the token and
its position live in small tensors the step reads (ChatGLM.decode_at), and attention masks the positions not
written yet. The sequence that decodes takes that tensor as its cache (its keys and values copied in); when
another sequence takes it, the previous one gets a copy of its part back. One graph, captured on first use and
kept (freeing graphs that share a memory pool trips an allocator assertion in torch 2.11).
Used by NativeBatcher for decode steps, one sequence after another (a sequence that takes the tensor over copies
its keys and values in, tens of MB: far less than an eager step costs); prefill runs eagerly.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .kvcache import CHUNK, KVCache

WARMUP_STEPS = 2   # eager runs on a side stream before capture, as torch.cuda.graph asks


class GraphedDecode:
    def __init__(self, model):
        self.model = model
        self.captures = 0
        self.slot: KVCache | None = None            # the graph's full-length cache tensor, as a KVCache
        self.owner = lambda: None                    # weak reference to the sequence's cache holding it
        self.graph = self.token = self.position = self.logits = None

    def __call__(self, cache: KVCache, token: int) -> Tensor:
        """The logits after `token`, which goes at the end of the cache (as model.forward([(cache, [token])]))."""
        cache.check(len(cache.ids) + 1)
        if self.owner() is not cache or cache.tensor is not self.slot.tensor:
            self.adopt(cache)
        self.token.fill_(token)
        self.position.fill_(len(cache.ids))
        self.graph.replay()
        cache.ids.append(token)
        return self.logits[0].clone()   # the next replay overwrites it

    def adopt(self, cache: KVCache) -> None:
        """Give the graph's tensor to this cache, its keys and values copied in; the previous holder keeps a copy."""
        if self.slot is None:
            self.slot = self.model.new_cache()
            self.slot.reserve_full()
        previous = self.owner()
        if previous is not None and previous.tensor is self.slot.tensor:
            kept = min(previous.max_length, -(-len(previous.ids) // CHUNK) * CHUNK)
            previous.tensor = self.slot.tensor[:, :, :, :kept].clone()
        n = len(cache.ids)
        if cache.tensor is not None and n:
            self.slot.tensor[:, :, :, :n] = cache.tensor[:, :, :, :n]
        cache.tensor = self.slot.tensor
        self.owner = weakref.ref(cache)
        if self.graph is None:
            self.capture(n)

    def capture(self, position: int) -> None:
        device = self.slot.tensor.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.full((1,), position, dtype=torch.long, device=device)   # warm-up writes the next slot
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.model.decode_at(self.slot, self.token, self.position)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_at(self.slot, self.token, self.position)
        self.captures += 1
