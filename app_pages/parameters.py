"""Parameters: how the model writes, per conversation, with the official defaults of each model version."""
import streamlit as st

from app import runtime
from app_pages.ui import plain_text, store_or_stop, visitor
from glm_core import GenerationParams
from storage import NotOwnerError

PRESETS = {
    "Precise": dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0),
    "Balanced": dict(do_sample=True, temperature=0.8, top_p=0.8, top_k=0, repetition_penalty=1.0),
    "Creative": dict(do_sample=True, temperature=1.1, top_p=0.95, top_k=0, repetition_penalty=1.05),
}

store = store_or_stop()
owner = visitor()
engine = runtime.models().engine
defaults = engine.default_params if engine is not None else GenerationParams()

st.title("Parameters")
if st.session_state.pop("params_saved", False):
    st.toast("Parameters saved.", icon=":material/check:")
cid = st.session_state.get("conversation")
try:
    conv = store.get_conversation(cid, owner) if cid else None
except NotOwnerError:   # someone else's (the operator's read-only view): its parameters are not ours to change
    conv = None
if conv is not None:
    st.caption(f"For the conversation **{plain_text(conv['title'] or 'Untitled')}**; saved with it.")
    saved = conv["params"]
else:
    st.caption("For your next new conversation (open a conversation in Chat to tune that one).")
    saved = st.session_state.get("new_chat_params", {})
params = GenerationParams.from_dict({**defaults.to_dict(), **saved})
if engine is not None:
    source = "the official chat demo" if engine.family.startswith("chatglm") else "GLM Studio"
    st.caption(f"Model defaults for **{plain_text(engine.name)}** are those of {source}.")



def save(chosen: GenerationParams) -> None:
    if conv is not None:
        store.update_conversation(conv["id"], owner, params=chosen.to_dict())
    else:
        st.session_state.new_chat_params = chosen.to_dict()
    for key in [k for k in st.session_state if str(k).startswith("param-")]:
        del st.session_state[key]   # the widgets show the saved values on the next run
    st.session_state.params_saved = True


cols = st.columns(len(PRESETS) + 1)
for col, (name, values) in zip(cols, PRESETS.items()):
    if col.button(name, width="stretch", help=", ".join(f"{k}={v}" for k, v in values.items())):
        save(GenerationParams.from_dict({**params.to_dict(), **values}))
        st.rerun()
if cols[-1].button("Model defaults", width="stretch"):
    save(defaults)
    st.rerun()

context = engine.context_length if engine is not None else 32768
with st.form("params"):
    left, right = st.columns(2)
    max_new = left.number_input("Max new tokens", 1, context, min(params.max_new_tokens, context), key="param-max-new",
                                help="The longest reply, in tokens.")
    max_length = left.number_input("Max length (prompt + reply)", 0, context, min(params.max_length or 0, context),
                                   key="param-max-length",
                                   help="The official ChatGLM limit on prompt and reply together; 0 = the model's context. "
                                        "Older turns are left out when a conversation outgrows it.")
    seed = left.number_input("Seed", 0, 2**31 - 1, params.seed or 0, key="param-seed",
                             help="0 = a new random reply each time; any other value repeats the same reply.")
    penalty = left.slider("Repetition penalty", 1.0, 2.0, float(params.repetition_penalty), 0.01, key="param-penalty",
                          help="Above 1 makes the model less likely to repeat tokens it has already used.")
    sample = right.toggle("Sample", params.do_sample, key="param-sample",
                          help="Off: always take the most likely token (greedy, repeatable).")
    temperature = right.slider("Temperature", 0.01, 2.0, float(params.temperature), 0.01, key="param-temperature",
                               help="Lower is more focused and predictable, higher more varied.")
    top_p = right.slider("Top-p", 0.01, 1.0, float(params.top_p), 0.01, key="param-top-p",
                         help="Sample only from the most likely tokens that together reach this probability.")
    top_k = right.number_input("Top-k", 0, 1000, int(params.top_k), key="param-top-k",
                               help="Sample only from this many most likely tokens; 0 = no limit.")
    if st.form_submit_button("Apply", type="primary"):
        chosen = GenerationParams(max_new_tokens=int(max_new), max_length=int(max_length) or None,
                                  do_sample=sample, temperature=temperature, top_p=top_p, top_k=int(top_k),
                                  repetition_penalty=penalty, seed=int(seed) or None)
        save(chosen)
        st.rerun()
