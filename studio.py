"""What every page shares: the process-wide model manager and store, the visitor, the password gate."""
from __future__ import annotations

import dataclasses
import hmac
import os
import re
import threading
import uuid

import psutil
import streamlit as st

from glm_core.manager import ModelManager
from storage import NewerSchemaError, Store, open_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the embedded model is local; never wait on a hub at start
VISITOR_COOKIE = "glm_studio_visitor"


@st.cache_resource(show_spinner=False)
def get_manager() -> ModelManager:
    """One model per process, shared by every visitor and every rerun."""
    return ModelManager()


@st.cache_resource(show_spinner=False)
def get_store() -> Store:
    return open_store()


def store_or_stop() -> Store:
    try:
        store = get_store()
    except NewerSchemaError as e:
        st.error(f"The history database cannot be opened: {e}")
        st.stop()
    if store.recovered_from is not None and not st.session_state.get("told_recovery"):
        st.session_state.told_recovery = True
        st.warning(f"The history database was damaged. It was moved aside to `{store.recovered_from}` "
                   f"and a fresh one was started at `{store.path}`.")
    return store


def visitor_id() -> str:
    """A stable id per browser, kept in a cookie for a year: each browser sees its own conversations."""
    cookie = st.context.cookies.get(VISITOR_COOKIE)
    cookie = cookie if isinstance(cookie, str) and cookie else None   # AppTest has no real cookies
    if "visitor" not in st.session_state:
        st.session_state.visitor = cookie or uuid.uuid4().hex
    if cookie != st.session_state.visitor and not st.session_state.get("cookie_set"):
        st.session_state.cookie_set = True
        # An HTML iframe shares the app's origin, so it can set the cookie the next visit reads.
        with st.sidebar:
            st.iframe(f"<script>parent.document.cookie = '{VISITOR_COOKIE}={st.session_state.visitor};"
                      f" max-age=31536000; path=/; SameSite=Lax';</script>", height=1)
    return st.session_state.visitor


def access_password() -> str:
    if os.environ.get("GLM_STUDIO_PASSWORD"):
        return os.environ["GLM_STUDIO_PASSWORD"]
    try:
        return str(st.secrets.get("password", ""))
    except FileNotFoundError:
        return ""


def is_admin() -> bool:
    """With a password set, whoever knows it may see every visitor's conversations."""
    return bool(access_password()) and st.session_state.get("authenticated", False)


def password_gate() -> None:
    """Every page stops here until the visitor gives the access password (when one is set)."""
    password = access_password()
    if not password or st.session_state.get("authenticated"):
        return
    st.title("GLM Studio")
    with st.form("login"):
        given = st.text_input("Access password", type="password")
        if st.form_submit_button("Enter", type="primary"):
            if hmac.compare_digest(given.encode(), password.encode()):
                st.session_state.authenticated = True
                st.rerun()
            st.error("Wrong password.")
    st.stop()


def engine_or_stop():
    """The loaded engine; loads the start-up model the first time, with a progress bar."""
    manager = get_manager()
    if manager.engine is not None:
        return manager.engine
    if manager.status.state == "error":
        st.error(f"The model could not be loaded: {manager.status.error}")
        st.page_link("app_pages/models.py", label="Choose another model", icon=":material/memory:")
        st.stop()
    bar = st.progress(0.0, text=f"Loading {manager.default[0]} ...")
    waiting = st.empty()
    try:
        manager.ensure_loaded(progress=lambda s: bar.progress(s.done / s.total if s.total else 0.0,
                                                              text=f"Loading {s.name} ({s.precision}, {s.device}): {s.label}"),
                              on_wait=lambda place: waiting.info(f"The model is busy; you are #{place} in line."))
    except Exception:  # noqa: BLE001 - the message is shown below
        pass
    bar.empty()
    waiting.empty()
    if manager.engine is None:
        st.error(f"The model could not be loaded: {manager.status.error}")
        st.page_link("app_pages/models.py", label="Choose another model", icon=":material/memory:")
        st.stop()
    return manager.engine


def lan_urls() -> list[str]:
    """http://<address>:<port> for every IPv4 address of this machine but loopback."""
    port = st.get_option("server.port")
    urls = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                urls.append(f"http://{a.address}:{port}")
    return urls


_INLINE_MATH = re.compile(r"\\\((.+?)\\\)", re.S)
_BLOCK_MATH = re.compile(r"\\\[(.+?)\\\]", re.S)


def render_markdown(text: str) -> str:
    """Model output as Streamlit markdown: LaTeX in \\( \\) and \\[ \\] becomes $ / $$, a literal $ stays a dollar.
    st.markdown never renders raw HTML (unsafe_allow_html stays off)."""
    parts = re.split(r"(```.*?```|`[^`\n]*`)", text, flags=re.S)   # leave code untouched
    for i in range(0, len(parts), 2):
        p = parts[i].replace("$", r"\$")
        p = _BLOCK_MATH.sub(lambda m: f"$$\n{m.group(1).strip()}\n$$", p)
        parts[i] = _INLINE_MATH.sub(lambda m: f"${m.group(1).strip()}$", p)
    return "".join(parts)


class BenchJob:
    """One benchmark running in the background for the whole app; its results go to SQLite as they come.
    Each measurement step takes the model queue like a chat request, so chats interleave between steps."""

    def __init__(self, spec, store: Store, manager: ModelManager):
        from glm_core import bench
        self.spec = spec
        self.cancel = threading.Event()
        self.progress = {"done": 0, "total": 1, "label": "starting", "eta_s": None}
        self.results: list[dict] = []
        self.error = ""
        self.run_id = store.create_bench_run(bench.machine_info(measure_bandwidth=False), dataclasses.asdict(spec))

        def on_event(event: dict) -> None:
            if event["type"] == "progress":
                self.progress = event
            else:
                self.results.append(event["result"])
                store.add_bench_result(self.run_id, event["result"])

        def work() -> None:
            status = "error"
            try:
                report = bench.run(spec, on_event, self.cancel, turn=lambda: manager.turn("benchmark"))
                status = "stopped" if report["cancelled"] else "done"
            except Exception as e:  # noqa: BLE001 - shown on the page, kept with the run
                self.error = f"{type(e).__name__}: {e}"
            finally:
                store.finish_bench_run(self.run_id, status)

        self.thread = threading.Thread(target=work, name=f"bench-{self.run_id}", daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()


@st.cache_resource(show_spinner=False)
def bench_slot() -> dict:
    """The one benchmark of the process: {"job": BenchJob | None}."""
    return {"job": None}
