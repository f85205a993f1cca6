"""The process-wide objects: one model service, one store and the services on them, each created once under a
lock on first use. Not in st.cache_resource: any connected client can clear that cache with one websocket
message, which would load a second copy of the model while replies are streaming."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

from glm_core.service import ModelService
from storage import Store, default_db_path, open_store

from .access import Access
from .bench_jobs import BenchJobs
from .chat import ChatService

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the embedded model is local; never wait on a hub at start
log = logging.getLogger("glm_studio")
T = TypeVar("T")
_lock = threading.RLock()
_objects: dict[str, object] = {}


def _once(name: str, make: Callable[[], T]) -> T:
    with _lock:
        if name not in _objects:
            _objects[name] = make()
        return _objects[name]


def data_dir() -> Path:
    """Where GLM Studio keeps its files: the folder of the history database."""
    return default_db_path().parent


def models() -> ModelService:
    """The model service; the start-up model begins loading when it is created."""
    def make() -> ModelService:
        service = ModelService()
        service.ensure_loading()
        return service
    return _once("models", make)


def store() -> Store:
    """The history database (NewerSchemaError when a newer GLM Studio wrote it: nothing is kept then)."""
    return _once("store", open_store)


def chat() -> ChatService:
    return _once("chat", lambda: ChatService(store(), models()))


def access() -> Access:
    return _once("access", lambda: Access(data_dir()))


def bench_jobs() -> BenchJobs:
    return _once("bench_jobs", lambda: BenchJobs(store(), models()))
