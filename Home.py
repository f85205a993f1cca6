"""GLM Studio: `streamlit run Home.py`. The router, and the home page."""
import streamlit as st

st.set_page_config(page_title="GLM Studio", page_icon=":material/forum:", layout="wide")

from studio import get_manager  # noqa: E402 - after set_page_config


def home() -> None:
    st.title("GLM Studio")
    st.caption("Run the ChatGLM family on your own hardware and share it with the people around you.")
    manager = get_manager()
    status = manager.status
    if manager.engine is not None:
        e = manager.engine
        st.success(f"**{e.name}** is loaded ({e.precision}, {e.device}).")
    elif status.state == "loading":
        st.info(f"Loading **{status.name}** ...")
    else:
        st.info(f"**{manager.default[0]}** loads when the first message is sent.")
    st.page_link("pages/chat.py", label="Start chatting", icon=":material/chat:")


pages = [
    st.Page(home, title="Home", icon=":material/home:", default=True),
    st.Page("pages/chat.py", title="Chat", icon=":material/chat:"),
    st.Page("pages/parameters.py", title="Parameters", icon=":material/tune:"),
    st.Page("pages/models.py", title="Models", icon=":material/memory:"),
    st.Page("pages/benchmark.py", title="Benchmark", icon=":material/speed:"),
]
st.navigation(pages).run()
