"""One model per process, shared by every visitor: loads, switches and a fair queue for generation.

Requests take the model in arrival order (a FIFO of tickets); a visitor who waits can read their place.
A load or switch takes the same queue, so nobody is handed a half-loaded model.
"""
from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import psutil
import torch

from . import load
from .engines import Engine
from .generate import GenerationParams, ReplyStats
from .registry import EMBEDDED, default_precision


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass
class LoadStatus:
    state: str = "empty"        # empty | loading | ready | error
    name: str = ""
    precision: str = ""
    device: str = ""
    done: int = 0
    total: int = 0
    label: str = ""
    error: str = ""
    seconds: float = 0.0


class ModelManager:
    def __init__(self, name: str | None = None, precision: str | None = None, device: str | None = None):
        name = name or os.environ.get("GLM_STUDIO_MODEL") or EMBEDDED
        precision = precision or os.environ.get("GLM_STUDIO_PRECISION") or default_precision(name)
        self.default = (name, precision, device or os.environ.get("GLM_STUDIO_DEVICE") or default_device())
        self.engine: Engine | None = None
        self.status = LoadStatus()
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._queue: deque[tuple[int, str]] = deque()   # (ticket, what it waits for)
        self.busy_with = ""                              # what holds the model now

    # -- the queue -------------------------------------------------------------------------

    @contextmanager
    def turn(self, what: str, on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Hold the model for one request, after everyone who asked before. on_wait(place) while waiting."""
        ticket = next(self._tickets)
        holding = False
        with self._cond:
            self._queue.append((ticket, what))
        try:
            with self._cond:
                while self._queue[0][0] != ticket:
                    if on_wait:
                        on_wait(self.place(ticket))
                    self._cond.wait(timeout=0.5)
                holding, self.busy_with = True, what
            yield
        finally:   # also when a visitor leaves while waiting: their ticket must not block the line
            with self._cond:
                self._queue.remove(next(item for item in self._queue if item[0] == ticket))
                if holding:
                    self.busy_with = ""
                self._cond.notify_all()

    def place(self, ticket: int) -> int:
        """1 = next in line (someone is using the model), 2 = one more ahead, ..."""
        return [t for t, _ in self._queue].index(ticket)

    def waiting(self) -> int:
        return max(0, len(self._queue) - 1)

    # -- loading ---------------------------------------------------------------------------

    def ensure_loaded(self, progress: Callable[[LoadStatus], None] | None = None,
                      on_wait: Callable[[int], None] | None = None) -> Engine:
        if self.engine is None and self.status.state != "error":
            self.switch(*self.default, progress=progress, on_wait=on_wait)
        if self.engine is None:
            raise RuntimeError(self.status.error or "no model is loaded")
        return self.engine

    def switch(self, name: str, precision: str, device: str,
               progress: Callable[[LoadStatus], None] | None = None,
               on_wait: Callable[[int], None] | None = None) -> Engine:
        """Free the current model, then load another. On failure no model is loaded and status says why."""
        with self.turn(f"loading {name}", on_wait):
            if self.engine is not None and (self.engine.name, self.engine.precision, self.engine.device) == (name, precision, device):
                return self.engine
            self.release()
            self.status = LoadStatus("loading", name, precision, device)
            start = time.perf_counter()

            def step(done: int, total: int, label: str) -> None:
                self.status.done, self.status.total, self.status.label = done, total, label
                if progress:
                    progress(self.status)
            try:
                self.engine = load(name, precision=precision, device=device, progress=step)
            except Exception as e:  # noqa: BLE001 - any load failure becomes a message in the UI
                self.status.state, self.status.error = "error", f"{type(e).__name__}: {e}"
                gc.collect()
                raise
            self.status.state = "ready"
            self.status.seconds = time.perf_counter() - start
            return self.engine

    def release(self) -> None:
        """Drop the model and its KV cache and give the memory back before anything else loads."""
        self.engine = None
        self.status = LoadStatus()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reset_cache(self) -> None:
        """Drop the KV cache (clear / new chat); waits for a reply in progress to end first."""
        with self.turn("clearing the cache"):
            if self.engine is not None:
                self.engine.reset()

    # -- generation ------------------------------------------------------------------------

    def stream_chat(self, messages: list[dict], params: GenerationParams | None, stop: threading.Event | None,
                    stats: ReplyStats, on_wait: Callable[[int], None] | None = None) -> Iterator[str]:
        """Text deltas of one reply, generated when this request's turn comes."""
        with self.turn("chat", on_wait):
            engine = self.engine
            if engine is None:
                raise RuntimeError(self.status.error or "no model is loaded")
            yield from engine.stream_chat(messages, params, stop, stats)


def memory_in_use() -> dict:
    """Resident memory of this process, and CUDA memory when there is a GPU (GB)."""
    out = {"rss_gb": psutil.Process().memory_info().rss / 1e9,
           "ram_total_gb": psutil.virtual_memory().total / 1e9,
           "ram_available_gb": psutil.virtual_memory().available / 1e9}
    if torch.cuda.is_available():
        out["vram_gb"] = torch.cuda.memory_allocated() / 1e9
        out["vram_total_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    return out
