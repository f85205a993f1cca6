"""GLM Studio: `streamlit run Home.py`. The router, the password gate, and the home page."""
import streamlit as st

st.set_page_config(page_title="GLM Studio", page_icon=":material/forum:", layout="wide")

from glm_core.manager import memory_in_use  # noqa: E402 - after set_page_config
from studio import get_manager, lan_urls, password_gate  # noqa: E402


def home() -> None:
    st.title("GLM Studio")
    st.caption("Run the ChatGLM family on your own hardware and share it with the people around you.")
    manager = get_manager()
    engine, status, mem = manager.engine, manager.status, memory_in_use()

    model, memory, share = st.columns(3)
    with model.container(border=True):
        st.markdown("**Model**")
        if engine is not None:
            st.markdown(f"### {engine.name}")
            st.caption(f"{engine.precision} · {engine.device} · {engine.family} · context {engine.context_length:,} tokens "
                       f"· loaded in {status.seconds:.1f} s")
        elif status.state == "loading":
            st.markdown(f"### {status.name}")
            st.caption(f"loading: {status.label}")
        elif status.state == "error":
            st.markdown("### none")
            st.error(status.error)
        else:
            st.markdown(f"### {manager.default[0]}")
            st.caption(f"{manager.default[1]} · {manager.default[2]} · loads with the first message")
        if manager.busy_with:
            st.caption(f"Busy: {manager.busy_with} · {manager.waiting()} waiting")
    with memory.container(border=True):
        st.markdown("**Memory**")
        st.markdown(f"### {mem['rss_gb']:.1f} GB")
        st.caption(f"used by GLM Studio · {mem['ram_available_gb']:.1f} of {mem['ram_total_gb']:.1f} GB RAM free")
        if "vram_gb" in mem:
            st.caption(f"GPU: {mem['vram_gb']:.1f} of {mem['vram_total_gb']:.1f} GB in use")
    with share.container(border=True):
        st.markdown("**Share**")
        port = st.get_option("server.port")
        st.markdown(f"Local: `http://localhost:{port}`")
        for url in lan_urls() or ["(no network address found)"]:
            st.markdown(f"Network: `{url}`")
        st.caption("Others on your network open the Network URL. Set GLM_STUDIO_PASSWORD to ask them for a password.")

    st.subheader("Start")
    st.markdown(
        "1. **Chat**: type a message; the reply streams in. Stop keeps what was written; "
        "Regenerate and Edit redo the last turn. Conversations are saved and listed in the sidebar.\n"
        "2. **Parameters**: length, temperature, top-p, top-k, repetition penalty and seed of the current conversation, "
        "or a preset.\n"
        "3. **Models**: switch model (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B, a local directory) and precision "
        "(FP32, BF16, FP16, INT8, INT4) without restarting.\n"
        "4. **Benchmark**: measure what each precision costs and saves on this machine.")
    st.page_link("app_pages/chat.py", label="Start chatting", icon=":material/chat:")


password_gate()
pages = [
    st.Page(home, title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/chat.py", title="Chat", icon=":material/chat:"),
    st.Page("app_pages/parameters.py", title="Parameters", icon=":material/tune:"),
    st.Page("app_pages/models.py", title="Models", icon=":material/memory:"),
    st.Page("app_pages/benchmark.py", title="Benchmark", icon=":material/speed:"),
]
st.navigation(pages).run()
