"""Chat: native chat elements, the reply streamed token by token."""
import streamlit as st

from glm_core import GenerationParams, ReplyStats
from studio import engine_or_stop, get_manager

st.title("Chat")
messages = st.session_state.setdefault("messages", [])

for m in messages:
    with st.chat_message(m["role"]):
        st.markdown(m["content"])

prompt = st.chat_input("Message GLM Studio")
if prompt:
    messages.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    engine = engine_or_stop()
    params = st.session_state.get("params") or engine.default_params
    stats = ReplyStats()
    with st.chat_message("assistant"):
        reply = st.write_stream(get_manager().stream_chat(messages, params, None, stats))
        st.caption(f"{stats.new_tokens} tokens · first token {stats.ttft_s:.2f} s · {stats.decode_tok_s:.1f} tokens/s")
    messages.append({"role": "assistant", "content": reply})
