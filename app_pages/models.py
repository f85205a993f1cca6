"""Models: what is loaded, what else can be, at which precision, on which device, and what it needs."""
import pandas as pd
import psutil
import streamlit as st
import torch

from glm_core import PRECISIONS
from glm_core.manager import memory_in_use
from glm_core.registry import MODELS, describe
from studio import get_manager

CUSTOM = "Local directory, .gguf file or Hub id ..."
manager = get_manager()
st.title("Models")

engine = manager.engine
mem = memory_in_use()
if engine is not None:
    st.success(f"Loaded: **{engine.name}** · {engine.precision} · {engine.device} · weights "
               f"{engine.weights_bytes / 1e9:.2f} GB · process RSS {mem['rss_gb']:.2f} GB", icon=":material/check_circle:")
elif manager.status.state == "loading":
    st.info(f"Loading **{manager.status.name}** ({manager.status.label}) ...")
elif manager.status.state == "error":
    st.error(f"The last load failed: {manager.status.error}")
if manager.busy_with:
    st.caption(f"The model is busy ({manager.busy_with}); {manager.waiting()} request(s) waiting. A switch waits its turn.")

st.subheader("Known models")
rows = [{"model": m.name, "family": m.family, "context": m.context, "source": m.source,
         **{p: (f"{m.weights_gb(p):.1f} GB" if not m.precisions()[p] else "—") for p in PRECISIONS}}
        for m in MODELS.values()]
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption("Memory for the weights alone; add the KV cache (grows with the conversation) and about 0.5 GB for the app. "
           "INT8/INT4 keep embeddings and the output layer in 16 bit. Weight-only quantization saves memory; "
           "it makes decoding faster only where memory bandwidth is the limit (see Benchmark).")

st.subheader("Load a model")
names = list(MODELS)
current = engine.name if engine is not None else manager.default[0]
choice = st.selectbox("Model", names + [CUSTOM], index=names.index(current) if current in names else len(names))
name = st.text_input("Path or Hub id", value="" if current in names else current,
                     placeholder="~/models/chatglm2-6b or THUDM/chatglm3-6b") if choice == CUSTOM else choice
info = describe(name) if name else None

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
        st.caption(f":material/block: **{p}**: {why}")

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
elif name:
    st.caption("Size unknown until it loads (a Hub id, or no weights found there).")

if st.button("Load", type="primary", icon=":material/download:", disabled=not name or not available or not enough):
    bar = st.progress(0.0, text="Waiting for the model to be free ...")
    waiting = st.empty()
    try:
        manager.switch(name, precision, device,
                       progress=lambda s: bar.progress(s.done / s.total if s.total else 0.0,
                                                       text=f"Loading {s.name}: {s.label} ({s.done}/{s.total})"),
                       on_wait=lambda place: waiting.info(f"Another request is using the model; you are #{place} in line."))
        st.session_state.loaded_notice = f"{name} is loaded ({precision}, {device}) in {manager.status.seconds:.1f} s."
    except Exception as e:  # noqa: BLE001 - any load failure is shown; the app keeps running without a model
        st.session_state.loaded_notice = ""
        st.session_state.load_error = str(e)
    st.rerun()
if st.session_state.get("loaded_notice"):
    st.success(st.session_state.pop("loaded_notice"))
if st.session_state.get("load_error"):
    st.error(f"Loading failed: {st.session_state.pop('load_error')}. No model is loaded now; load one to chat.")
