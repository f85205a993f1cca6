"""How many threads the model's products use: every core while the cores are free, one fewer for each core that
other processes keep busy.

Why: an OpenMP team that shares a core with another busy process waits at every barrier for its thread on that
core, and a model made of many small products has thousands of barriers a token. On a 2-core EPYC the embedded
model (fp32) decoded 20.8 tok/s quiet and 5.7 with one core busy on 2 threads; 1 thread decoded 17.2 quiet and
16.8 busy (BENCHMARKS.md). OpenMP's passive wait policy instead halves the quiet speed, so threads, not the wait
policy, follow the load. The count is a thread's own setting (OpenMP's nthreads ICV), so the thread that runs
the model calls `update` before its steps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psutil
import torch

from .registry import env_int

log = logging.getLogger(__name__)

WINDOW_S = 1.0      # how often the CPU accounting is read again
FIRST_WINDOW_S = 0.25  # the first decision's window, waited for: a load on a busy machine starts right too
TAKE_CORE = 0.6     # others' use (cores, fractional part) at which one more core is left to them
GIVE_BACK = 0.35    # ... and under which a core left to them is taken back (between the two: keep the count)


def busy_cores_to_leave(others: float, left: int) -> int:
    """Cores to leave to other processes that used `others` cores on average, `left` being left now."""
    down = int(others + 1 - TAKE_CORE)   # others 0.6 -> 1, 1.6 -> 2
    up = int(others + 1 - GIVE_BACK)     # others under 0.35 -> 0, under 1.35 -> 1
    return down if left < down else up if left > up else left


@dataclass
class Sample:
    at: float       # wall clock (monotonic), s
    busy: float     # CPU seconds all processes spent, over all cores
    own: float      # CPU seconds this process spent


def sample() -> Sample:
    cpu = psutil.cpu_times()
    idle = cpu.idle + getattr(cpu, "iowait", 0.0)
    total = sum(cpu) - getattr(cpu, "guest", 0.0) - getattr(cpu, "guest_nice", 0.0)   # guest time is in user already
    mine = psutil.Process().cpu_times()
    return Sample(time.monotonic(), total - idle, mine.user + mine.system)


class ThreadPolicy:
    """`update()` in the generating thread sets its torch thread count from what other processes used lately.
    GLM_STUDIO_THREADS fixes the count instead."""

    def __init__(self, cores: int | None = None, fixed: int | None = None):
        self.cores = cores or torch.get_num_threads()
        self.fixed = fixed or env_int("GLM_STUDIO_THREADS", None)
        self.left = 0                  # cores left to other processes
        self.others = 0.0
        self._last: Sample | None = None
        self._set: int | None = None   # the count set in the calling thread (None: not yet)

    @property
    def threads(self) -> int:
        return self.fixed or self.cores - self.left

    def update(self) -> int:
        """The thread count for the next steps, set in the calling thread; re-decided every WINDOW_S."""
        if self.fixed is None:
            if self._last is None:
                self.observe(sample())
                time.sleep(FIRST_WINDOW_S)
                self.observe(sample())
            elif time.monotonic() - self._last.at >= WINDOW_S:
                self.observe(sample())
        if self._set != self.threads:
            torch.set_num_threads(self.threads)
            self._set = self.threads
        return self.threads

    def observe(self, current: Sample) -> None:
        last, self._last = self._last, current
        if last is None or current.at <= last.at:
            return
        self.others = max(0.0, (current.busy - last.busy) - (current.own - last.own)) / (current.at - last.at)
        left = min(busy_cores_to_leave(self.others, self.left), self.cores - 1)
        if left != self.left:
            log.info("other processes use %.1f cores: the model now runs %d threads", self.others, self.cores - left)
        self.left = left
