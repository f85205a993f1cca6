"""What every page shares: the process-wide model manager, and the one place the app reads its settings."""
from __future__ import annotations

import os

import streamlit as st

from glm_core.manager import ModelManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the embedded model is local; never wait on a hub at start


@st.cache_resource(show_spinner=False)
def get_manager() -> ModelManager:
    """One model per process, shared by every visitor and every rerun."""
    return ModelManager()


def engine_or_stop():
    """The loaded engine; loads the start-up model the first time with a progress bar."""
    manager = get_manager()
    if manager.engine is not None:
        return manager.engine
    if manager.status.state == "error":
        st.error(f"The model could not be loaded: {manager.status.error}")
        st.page_link("pages/models.py", label="Choose another model", icon=":material/memory:")
        st.stop()
    name = manager.default[0]
    bar = st.progress(0.0, text=f"Loading {name} ...")
    waiting = st.empty()

    def show(status):
        frac = status.done / status.total if status.total else 0.0
        bar.progress(frac, text=f"Loading {status.name} ({status.precision}, {status.device}): {status.label}")

    try:
        manager.switch(*manager.default, progress=show,
                       on_wait=lambda place: waiting.info(f"Another visitor is loading a model; you are #{place} in line."))
    except Exception:  # noqa: BLE001 - the message is shown below
        pass
    bar.empty()
    waiting.empty()
    if manager.engine is None:
        st.error(f"The model could not be loaded: {manager.status.error}")
        st.stop()
    return manager.engine
