"""Models: what is loaded, what else can be, at which precision, on which device, and what it needs.
Everyone sees what is loaded; only the operator loads, switches or unloads."""
import pandas as pd
import psutil
import streamlit as st
import torch

from app import runtime
from app.access import loadable, models_dir
from app_pages.ui import error, is_operator, plain_text
from glm_core import PRECISIONS
from glm_core.engines import remote_name
from glm_core.registry import MODELS, describe
from glm_core.remote import RemoteError, RemoteServer
from glm_core.service import memory_in_use

CUSTOM = "Local directory, .gguf file or Hub id ..."
models = runtime.models()
st.title("Models")
if models.loading:   # whoever started it: once it ends the whole page is drawn again (the Load button, the precision)
    st.session_state.load_seen = True


@st.fragment(run_every=1.0 if st.session_state.get("load_seen") else None)
def loaded() -> None:
    """What is loaded, and a load in progress with its bar; redrawn every second while one runs."""
    engine, status, mem = models.engine, models.status, memory_in_use()
    if models.loading:
        share = status.done / status.total if status.total else 0.0
        st.progress(share, text=plain_text(f"Loading {status.name or models.default[0]} ({status.precision}, "
                                           f"{status.device}): {status.label or 'starting'}"))
    elif engine is not None:
        st.success(plain_text(f"Loaded: {engine.name} · {engine.precision} · {engine.device} · weights "
                              f"{engine.weights_bytes / 1e9:.2f} GB · process RSS {mem['rss_gb']:.2f} GB"),
                   icon=":material/check_circle:")
    else:
        st.info("No model is loaded.")
    if status.error:
        if is_operator():
            error(status.error)
        else:
            st.caption("The last load failed; the operator has the details.")
    if models.running or models.waiting:
        st.caption(f"{models.running} replies being written, {models.waiting} waiting. A switch starts once the "
                   f"running replies are done; new ones wait for it.")
    if st.session_state.get("load_seen") and not models.loading:
        del st.session_state["load_seen"]
        st.rerun()


loaded()

st.subheader("Known models")
rows = [{"model": m.name, "family": m.family, "context": m.context, "source": m.source,
         **{p: (f"{m.weights_gb(p):.1f} GB" if not m.precisions()[p] else "—") for p in PRECISIONS}}
        for m in MODELS.values()]
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption("Memory for the weights alone; add the KV cache (grows with the conversations) and about 0.5 GB for the "
           "app. INT8/INT4 keep the embedding table and the output layer in 8 bit. Weight-only quantization saves "
           "memory; it makes decoding faster only where memory bandwidth is the limit (see Benchmark).")

if not is_operator():
    st.caption("The operator (whoever started the server) loads and switches models: sign in as the operator in "
               "the sidebar to do it.")
    st.stop()

st.subheader("Load a model")
engine = models.engine
names = list(MODELS)
current = engine.name if engine is not None else models.default[0]
choice = st.selectbox("Model", names + [CUSTOM], index=names.index(current) if current in names else len(names))
name = st.text_input("Path or Hub id", value="" if current in names else current, max_chars=1000,
                     placeholder=f"{models_dir()}/chatglm2-6b or THUDM/chatglm3-6b").strip() if choice == CUSTOM else choice
refused = loadable(name) if name else ""
if refused:
    error(refused)
info = describe(name) if name and not refused else None

devices = {"cpu": ""}
devices["cuda"] = "" if torch.cuda.is_available() else "no CUDA GPU on this machine"
devices["mps"] = "" if torch.backends.mps.is_available() else "no Apple GPU (MPS) on this machine"
reasons = info.precisions() if info is not None else {p: "" for p in PRECISIONS}
device = st.radio("Device", [d for d, why in devices.items() if not why], horizontal=True,
                  index=1 if not devices["cuda"] else 0)
if device == "mps":
    for p in ("int8", "int4"):
        reasons[p] = reasons[p] or "torch has no weight-only INT8/INT4 kernels for MPS"
available = [p for p in PRECISIONS if not reasons[p]]
default_precision = engine.precision if engine is not None and engine.precision in available else available[0]
precision = st.radio("Precision", available, horizontal=True, index=available.index(default_precision) if available else 0,
                     captions=[f"{info.weights_gb(p):.2f} GB" if info else "" for p in available])
for p, why in {**devices, **reasons}.items():
    if why:
        st.caption(f":material/block: **{p}**: {plain_text(why)}")

need_gb = info.weights_gb(precision) * 1.1 + 0.3 if info is not None and precision else 0.0
freed = engine.weights_bytes / 1e9 if engine is not None else 0.0
if device == "cuda":
    free_gb = torch.cuda.mem_get_info()[0] / 1e9 + (freed if engine is not None and engine.device.startswith("cuda") else 0)
else:
    free_gb = psutil.virtual_memory().available / 1e9 + (freed if engine is not None and engine.device == "cpu" else 0)
enough = need_gb <= free_gb
if info is not None:
    (st.caption if enough else st.error)(
        f"Needs about {need_gb:.1f} GB; {free_gb:.1f} GB {'of GPU memory ' if device == 'cuda' else ''}is free "
        f"once the current model is unloaded." + ("" if enough else " Not enough memory: pick a lower precision or a smaller model."))
elif name and not refused:
    st.caption("Size unknown until it loads (a Hub id, or no weights found there).")

if st.button("Load", type="primary", icon=":material/download:",
             disabled=not name or bool(refused) or not available or not enough or models.loading):
    models.load(name, precision, device)   # the service loads it between replies; leaving this page changes nothing
    st.rerun()

st.subheader("Or use another server's model")
st.caption("Any OpenAI-compatible server: vLLM or SGLang on GPU machines (ChatGLM2/3, GLM-4), llama.cpp's server or "
           "Ollama (GGUF models), another GLM Studio. That server runs the model and batches the requests; chat, "
           "history and the stats line stay here.")
with st.form("remote"):
    base_url = st.text_input("Base URL", placeholder="http://gpu-box:8000/v1", max_chars=500)
    api_key = st.text_input("API key", type="password", max_chars=500, help="Kept in memory only, never saved.")
    listed = st.form_submit_button("List its models", icon=":material/list:")
if listed and base_url.strip():
    try:
        st.session_state.remote_listing = (base_url.strip(), api_key, RemoteServer(base_url.strip(), api_key, timeout_s=10).models())
    except RemoteError as e:
        st.session_state.pop("remote_listing", None)
        error(str(e))
if st.session_state.get("remote_listing"):
    url, key, served = st.session_state.remote_listing
    if not served:
        st.info(plain_text(f"{url} serves no model."))
    else:
        chosen = st.selectbox(f"Models of {plain_text(url)}", served)
        if st.button("Use this model", type="primary", icon=":material/cloud:", disabled=models.loading):
            models.load(remote_name(url, chosen), "remote", "remote", api_key=key)
            st.rerun()
