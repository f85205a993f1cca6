"""The model service: one per process, its worker thread owns the model and generates every reply.

Callers (the chat pages, the terminal chat, the HTTP API) `submit` a request and get a `Request` handle: the text
so far, deltas as they come, stats, status and `cancel()`. The reply does not depend on the caller staying: a
visitor may leave the page and come back to it, finished or still streaming.

Continuous batching: between decode steps waiting requests join the running batch (up to `max_batch`) and
finished ones leave it. A new prompt is read in chunks inside the same steps, so running streams keep moving
(batch.py). Requests are admitted in arrival order, except that an owner with fewer requests running goes first,
so one caller cannot fill the batch while others wait. Loads and switches run in the same worker, between
steps, once the running replies have finished (new ones wait behind the load): a visitor leaving the page during a
load loses nothing, and a failed switch puts the previous model back.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import psutil
import torch

from .engines import Engine
from .generate import Decoding, GenerationParams, PromptTooLongError, ReplyStats, TextStream
from .registry import EMBEDDED, default_precision, env_int
from .threads import ThreadPolicy

log = logging.getLogger(__name__)

MAX_BATCH = 8        # sequences decoded together
MAX_WAITING = 64     # requests waiting beyond the batch before new ones are refused (ServiceBusy)

T = TypeVar("T")


class ServiceBusy(RuntimeError):
    """Too many requests are waiting; try again later."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadStatus:
    state: str = "empty"        # empty | loading | ready | error
    name: str = ""
    precision: str = ""
    device: str = ""
    done: int = 0
    total: int = 0
    label: str = ""
    error: str = ""             # why the last load failed (with state ready: the previous model was put back)
    seconds: float = 0.0


class Request:
    """One reply being generated. Read `text`, `status` ("waiting", "running", "done"), `finish_reason` (stop,
    length, stopped, error), `error`, `stats`; wait for more with `wait` or iterate `deltas()`; `cancel()` ends it
    within one token and keeps what was written."""

    def __init__(self, service: "ModelService", messages: list[dict] | None, params: GenerationParams | None,
                 owner: str, key: str | None, prompt_ids: list[int] | None):
        self.id = uuid.uuid4().hex
        self.service, self.messages, self.params = service, messages, params   # None: the model's defaults
        self.owner, self.key, self.prompt_ids = owner, key, prompt_ids
        self.whole = False            # the messages must fit as given (an API call: its caller chose them)
        self.status = "waiting"
        self.finish_reason = ""
        self.error = ""
        self.text = ""
        self.pieces: list[str] = []   # the text as written: a piece per token (per chunk from a remote server)
        self.model = ""               # name (precision) of the model that wrote it
        self.engine_name = self.precision = ""
        self.clean: Callable[[str], str] = lambda text: text   # the model's clean-up of a finished reply
        self.stats = ReplyStats()
        self.version = 0              # grows with every change a viewer may want to show
        self.submitted_at = time.perf_counter()
        self.first_token_at = self.finished_at = 0.0   # perf_counter times, for benchmarks
        self._changed = threading.Condition()
        self._cancelled = threading.Event()

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def place(self) -> int:
        """1 = next to join the batch, 2 = one ahead, ...; 0 once running or done."""
        return self.service.place(self)

    def cancel(self) -> None:
        self._cancelled.set()
        self.service.wake()

    def wait(self, seen: int = -1, timeout: float | None = None) -> int:
        """Block until the request changed since version `seen` (or is done, or the timeout passed); the version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version > seen or self.done, timeout)
            return self.version

    def deltas(self, timeout: float | None = None) -> Iterator[str]:
        """The text's pieces as they were written, one at a time however late the reader comes, until the reply is
        done; TimeoutError when nothing changed for `timeout` seconds."""
        sent, seen = 0, -1
        while True:
            version = self.wait(seen, timeout)
            done = self.done
            if version == seen and not done:
                raise TimeoutError(f"no change in {timeout} s")
            seen, new = version, self.pieces[sent:]
            sent += len(new)
            yield from new
            if done:
                return

    def result(self, timeout: float | None = None) -> "Request":
        """Wait until done; self."""
        with self._changed:
            self._changed.wait_for(lambda: self.done, timeout)
        return self

    def _update(self, delta: str = "", status: str | None = None) -> None:
        with self._changed:
            if delta:
                self.text += delta
                self.pieces.append(delta)
            if status is not None:
                self.status = status
            self.version += 1
            self._changed.notify_all()

    def _finish(self, reason: str, error: str = "") -> None:
        self.stats.finish_reason, self.finish_reason, self.error = reason, reason, error
        self.finished_at = time.perf_counter()
        self._update(status="done")


@dataclass(eq=False)
class _Active:
    """A request in the batch: its sequence in the batcher, its token choices and its text."""
    request: Request
    seq: object
    decoding: Decoding
    stream: TextStream
    next_token: int | None = None


class ModelService:
    """See the module docstring. `engine` is the loaded model (None while none is); `status` says what happens."""

    def __init__(self, name: str | None = None, precision: str | None = None, device: str | None = None,
                 max_batch: int | None = None, max_waiting: int | None = None,
                 load: Callable[..., Engine] | None = None):
        name = name or os.environ.get("GLM_STUDIO_MODEL") or EMBEDDED
        precision = precision or os.environ.get("GLM_STUDIO_PRECISION") or default_precision(name)
        self.default = (name, precision, device or os.environ.get("GLM_STUDIO_DEVICE") or default_device())
        self.max_batch = max_batch or env_int("GLM_STUDIO_MAX_BATCH", MAX_BATCH)
        self.max_waiting = max_waiting or env_int("GLM_STUDIO_MAX_QUEUE", MAX_WAITING)
        if load is None:
            from . import load
        self._load = load
        self.engine: Engine | None = None
        self.loaded_as: tuple[str, str, str, str] | None = None   # what load() was asked for (engine.name may differ)
        self.status = LoadStatus()
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[_Active] = []
        self._pending_load: tuple[str, str, str, str] | None = None   # name, precision, device, api key
        self._remote: dict[Request, threading.Thread] = {}   # replies streaming from a remote server
        self._switching = False
        self._holds = 0              # callers holding the model: nothing is admitted meanwhile (a benchmark)
        self.held_for = ""
        self._chores: list[tuple[Callable, Future]] = []   # work asked by other threads, for the worker (call)
        self.threads = ThreadPolicy()   # the worker's thread count, following the other processes' load
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="glm-model-service", daemon=True)
        self._worker.start()

    # -- what callers use -------------------------------------------------------------------------

    def submit(self, messages: list[dict] | None = None, params: GenerationParams | None = None, owner: str = "",
               key: str | None = None, prompt_ids: list[int] | None = None, whole: bool = False) -> Request:
        """Queue a reply to `messages` (the last one the new user turn) or to raw `prompt_ids`. `key` names the
        conversation (its KV cache is kept for its next turn). The oldest turns are left out when the
        conversation outgrows the context, unless `whole`. A prompt that cannot fit raises PromptTooLongError at
        once when a model is loaded; a full queue raises ServiceBusy."""
        if messages is None and prompt_ids is None:
            raise ValueError("submit needs messages or prompt_ids")
        request = Request(self, messages, params, owner, key, prompt_ids)
        request.whole = whole
        engine = self.engine
        if engine is not None and not engine.is_remote:
            self._prompt(engine, request)   # fail fast; admission builds it again for the engine loaded then
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise ServiceBusy(f"{len(self._waiting)} requests are waiting for the model; try again in a moment")
            self._load_default_if_empty()
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def load(self, name: str, precision: str, device: str, api_key: str = "") -> None:
        """Switch to another model (or reload): once the running replies are done, the current model is freed and
        this one loaded; `status` follows it. On failure the previous model is loaded again. `api_key`: a remote
        server's (remote:BASE_URL#MODEL), kept in memory only."""
        with self._lock:
            self._pending_load = (name, precision, device, api_key)
            self._lock.notify_all()

    def ensure_loading(self) -> None:
        """Load the start-up model when nothing is loaded or loading (and the last load did not fail)."""
        with self._lock:
            self._load_default_if_empty()
            self._lock.notify_all()

    def _load_default_if_empty(self) -> None:
        if self.engine is None and self._pending_load is None and self.status.state == "empty":
            self._pending_load = (*self.default, os.environ.get("GLM_STUDIO_REMOTE_KEY", ""))

    def wait_loaded(self, timeout: float | None = None) -> Engine:
        """Block until no load is pending or running; the engine, or ModelLoadError saying why there is none."""
        from .engines import ModelLoadError
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.loading:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.status.name} is still loading after {timeout} s")
            time.sleep(0.05)
        if self.engine is None:
            raise ModelLoadError(self.status.error or "no model is loaded")
        return self.engine

    @contextmanager
    def hold(self, what: str) -> Iterator[None]:
        """Keep the model idle while the block runs (a benchmark measuring on the same machine): it waits for the
        running replies to end; new ones wait until the block is over."""
        with self._lock:
            self._holds += 1
            self.held_for = what
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._active and not self._remote and not self._switching)
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                self.held_for = "" if not self._holds else self.held_for
                self._lock.notify_all()

    def forget(self, key: str | None = None) -> None:
        """Free the KV cache kept for a conversation (all when key is None): a cleared or deleted chat."""
        def chore() -> None:
            if self.engine is not None and self.engine.batcher is not None:
                self.engine.batcher.clear(key)
        self.call(chore)

    def call(self, fn: Callable[[], T]) -> "Future[T]":
        """Run fn in the worker thread, between steps: the model's batcher is the worker's alone, and the thread
        that runs the model is the one whose thread count and caches a measurement should see (the benchmark).
        Cancelled when the service closes first."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                future.cancel()
            else:
                self._chores.append((fn, future))
                self._lock.notify_all()
        return future

    def find(self, key: str) -> Request | None:
        """The reply being written (or waiting) for a conversation, if any."""
        with self._lock:
            live = [a.request for a in self._active] + list(self._remote) + list(self._waiting)
        return next((r for r in live if r.key == key and not r.done), None)

    def place(self, request: Request) -> int:
        with self._lock:
            try:
                return self._waiting.index(request) + 1
            except ValueError:
                return 0

    @property
    def running(self) -> int:
        return len(self._active) + len(self._remote)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def loading(self) -> bool:
        return self._pending_load is not None or self._switching

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def close(self, timeout: float = 30) -> None:
        """Stop the worker (ending running replies as stopped) and free the model."""
        with self._lock:
            self._closed = True
            for request in [a.request for a in self._active] + list(self._remote) + list(self._waiting):
                request.cancel()
            self._lock.notify_all()
        self._worker.join(timeout)

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    self._lock.wait_for(self._has_work)
                    if self._closed and not self._active:
                        break
                    chores, self._chores = self._chores, []
                for fn, future in chores:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - the caller gets it from the future
                            future.set_exception(e)
                self._end_cancelled()
                if self._pending_load is not None and not self._active and not self._remote:
                    with self._lock:
                        target, self._pending_load, self._switching = self._pending_load, None, True
                    try:
                        self._switch(*target)
                    finally:
                        self._switching = False
                        self.wake()
                    continue
                if self._pending_load is None and not self._holds:
                    self._admit()
                if self._active:
                    self._step()
                    if not self._active:
                        self.wake()   # someone may wait for an idle model (hold)
        for request in list(self._waiting):
            request._finish("stopped")
        for _, future in self._chores:
            future.cancel()
        self._release()

    def _has_work(self) -> bool:
        room = len(self._active) + len(self._remote) < self.max_batch
        admittable = (self._waiting and room and not self._holds and self._pending_load is None
                      and (self.engine is not None or self.status.state == "error"))
        switchable = self._pending_load is not None and not self._remote   # remote replies end first
        return bool(self._active or self._chores or self._closed or switchable or admittable)

    def _prompt(self, engine: Engine, request: Request) -> list[int]:
        request.params = request.params or engine.default_params
        if request.prompt_ids is not None:
            if len(request.prompt_ids) >= engine.context_length:
                raise PromptTooLongError(f"the prompt has {len(request.prompt_ids)} tokens; {engine.name} takes "
                                         f"at most {engine.context_length} for prompt and reply together")
            return request.prompt_ids
        ids, request.stats.dropped_turns = engine.fit_messages(request.messages, request.params, request.whole)
        return ids

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or len(self._active) + len(self._remote) >= self.max_batch:
                    return
                running = {}
                for a in self._active:
                    running[a.request.owner] = running.get(a.request.owner, 0) + 1
                request = min(self._waiting, key=lambda r: running.get(r.owner, 0))   # first among the least served
                self._waiting.remove(request)
            engine = self.engine
            if engine is None:
                request._finish("error", f"no model is loaded: {self.status.error or 'load one on the Models page'}")
                continue
            if request.cancelled:
                request._finish("stopped")
                continue
            if engine.is_remote:
                self._start_remote(engine, request)
                continue
            try:
                ids = self._prompt(engine, request)
                request.stats.wait_s = time.perf_counter() - request.submitted_at
                decoding = Decoding(ids, request.params, engine.stop_ids, engine.context_length, engine.vocab_limit,
                                    request.stats)
                seq = engine.batcher.open(ids, request.key)
            except Exception as e:  # noqa: BLE001 - a prompt that cannot run fails alone, with its reason
                request._finish("error", str(e) if isinstance(e, PromptTooLongError) else f"{type(e).__name__}: {e}")
                continue
            request.model = f"{engine.name} ({engine.precision})"
            request.engine_name, request.precision, request.clean = engine.name, engine.precision, engine.clean
            self._active.append(_Active(request, seq, decoding, TextStream(engine.decode)))
            request._update(status="running")

    def _start_remote(self, engine: Engine, request: Request) -> None:
        """A reply from another server, streamed by a thread of its own (that server batches); the stop event is
        the request's cancel."""
        request.params = request.params or engine.default_params
        request.stats.wait_s = time.perf_counter() - request.submitted_at
        request.model, request.engine_name, request.precision = engine.name, engine.name, engine.precision

        def stream() -> None:
            error = ""
            try:
                for delta in engine.stream_chat(request.messages, request.params, request._cancelled, request.stats):
                    if request.first_token_at == 0.0:
                        request.first_token_at = time.perf_counter()
                    request._update(delta)
            except Exception as e:  # noqa: BLE001 - the server's failure is this reply's, said in it
                error = str(e)
            with self._lock:
                del self._remote[request]
                self._lock.notify_all()
            reason = "error" if error else ("stopped" if request.cancelled else request.stats.finish_reason or "stop")
            request._finish(reason, error)
        thread = threading.Thread(target=stream, name=f"remote-{request.id[:8]}", daemon=True)
        with self._lock:
            self._remote[request] = thread
        request._update(status="running")
        thread.start()

    def _end_cancelled(self) -> None:
        for a in [a for a in self._active if a.request.cancelled]:
            a.decoding.stop()
            self._retire(a)
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            r._finish("stopped")

    def _step(self) -> None:
        engine = self.engine
        decode = [(a.seq, a.next_token) for a in self._active if a.next_token is not None]
        prefill = next((a for a in self._active if a.next_token is None), None)
        self.threads.update()
        try:
            logits = engine.batcher.step(prefill.seq if prefill else None, decode)
        except Exception as e:  # noqa: BLE001 - a failed step fails the replies in it, the service goes on
            log.exception("a generation step failed")
            for a in list(self._active):
                if a.next_token is not None or a is prefill:
                    a.request._finish("error", f"{type(e).__name__}: {e}")
                    self._active.remove(a)
                    engine.batcher.close(a.seq, keep=False)
            return
        for a in list(self._active):
            if a.seq not in logits:
                continue
            if a.request.cancelled:
                a.decoding.stop()
                self._retire(a)
                continue
            token = a.decoding.choose(logits[a.seq])
            a.request.first_token_at = a.decoding.first_at
            delta = "" if token in engine.stop_ids else a.stream.push(token)
            if a.decoding.done:
                self._retire(a, delta)
            else:
                a.next_token = token
                if delta:
                    a.request._update(delta)

    def _retire(self, a: _Active, delta: str = "") -> None:
        self._active.remove(a)
        self.engine.batcher.close(a.seq)
        a.request._update(delta + a.stream.flush())
        a.request._finish(a.decoding.stats.finish_reason)

    # -- loading ---------------------------------------------------------------------------------

    def _switch(self, name: str, precision: str, device: str, api_key: str) -> None:
        back = self.loaded_as if self.engine is not None else None
        if back == (name, precision, device, api_key):
            return
        self._release()
        error = self._try_load(name, precision, device, api_key)
        if error and back is not None:
            error_back = self._try_load(*back)
            if error_back:
                self.status.error = f"loading {name} failed ({error}); loading {back[0]} again failed too ({error_back})"
            else:
                self.status.error = f"loading {name} ({precision}, {device}) failed: {error}. {back[0]} is loaded again."

    def _try_load(self, name: str, precision: str, device: str, api_key: str = "") -> str:
        """Load a model into the service; '' on success, else why not (status then says error)."""
        self.status = LoadStatus("loading", name, precision, device)
        start = time.perf_counter()

        def progress(done: int, total: int, label: str) -> None:
            self.status.done, self.status.total, self.status.label = done, total, label
            self.threads.update()   # loading (quantizing) runs on the same threads as generating
        self.threads.update()
        try:
            extra = {"api_key": api_key} if api_key else {}
            engine = self._load(name, precision=precision, device=device, progress=progress, **extra)
        except Exception as e:  # noqa: BLE001 - any load failure is a message, the service goes on
            log.warning("loading %s (%s, %s) failed: %s", name, precision, device, e)
            self.status.state, self.status.error = "error", f"{type(e).__name__}: {e}"
            gc.collect()
            return self.status.error
        self.engine, self.loaded_as = engine, (name, precision, device, api_key)
        self.status.state, self.status.seconds = "ready", time.perf_counter() - start
        log.info("loaded %s (%s, %s) in %.1f s", name, precision, device, self.status.seconds)
        return ""

    def _release(self) -> None:
        """Drop the model and its KV caches and give the memory back before anything else loads."""
        self.engine = None
        self.status = LoadStatus()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def memory_in_use() -> dict:
    """Resident memory of this process, and CUDA memory when there is a GPU (GB)."""
    out = {"rss_gb": psutil.Process().memory_info().rss / 1e9,
           "ram_total_gb": psutil.virtual_memory().total / 1e9,
           "ram_available_gb": psutil.virtual_memory().available / 1e9}
    if torch.cuda.is_available():
        out["vram_gb"] = torch.cuda.memory_allocated() / 1e9
        out["vram_total_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    return out
