"""GLM Studio: `streamlit run Home.py`. The server, the router, the sign-in gate and the home page."""
import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

if get_script_run_ctx(suppress_warning=True) is None:
    # `streamlit run` imports this file to find its server: Streamlit's own, with GLM Studio's API routes, signed
    # visitor cookies and error ids in front of it (app/server.py). Each visitor's session then runs this file.
    from app import server
    app = st.App(__file__, routes=server.routes(), middleware=server.middleware(), lifespan=server.lifespan,
                 on_script_error=server.on_script_error)
else:
    st.set_page_config(page_title="GLM Studio", page_icon=":material/forum:", layout="wide")

    from app import runtime
    from app_pages.ui import error, gate, is_operator, lan_urls, operator_sign_in, plain_text, visitor
    from glm_core.service import memory_in_use

    def home() -> None:
        st.title("GLM Studio")
        st.caption("Run the ChatGLM family on your own hardware and share it with the people around you.")
        models, mem = runtime.models(), memory_in_use()
        engine, status = models.engine, models.status
        model, memory, share = st.columns(3)
        with model.container(border=True):
            st.markdown("**Model**")
            if engine is not None:
                st.markdown(f"### {plain_text(engine.name)}")
                st.caption(plain_text(f"{engine.precision} · {engine.device} · {engine.family} · context "
                                      f"{engine.context_length:,} tokens · loaded in {status.seconds:.1f} s"))
            elif models.loading:
                st.markdown(f"### {plain_text(status.name or models.default[0])}")
                st.caption(plain_text(f"loading: {status.label}" if status.label else "loading"))
            else:
                st.markdown("### none")
            if status.error and is_operator():
                error(status.error)
            elif status.error:
                st.caption("The last model load failed; the operator has the details.")
            busy = f"{models.running} replying · {models.waiting} waiting"
            st.caption(busy + (f" · held for {models.held_for}" if models.held_for else ""))
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
            if is_operator():
                exposure = runtime.access().exposure(st.get_option("server.address") or "0.0.0.0", port)
                st.caption(f"Bound to {exposure.address or 'every interface'} · password "
                           f"{'on' if exposure.password else 'off'} · {exposure.visitors} visitors in the last 5 minutes")
                if exposure.warning:
                    st.warning(exposure.warning, icon=":material/warning:")
            else:
                st.caption("Others on your network open the Network URL.")

        st.subheader("Start")
        st.markdown(
            "1. **Chat**: type a message; the reply streams in, and keeps being written if you open another page. "
            "Stop keeps what was written; Regenerate and Edit redo the last turn. Conversations are saved and "
            "listed in the sidebar; only you see yours.\n"
            "2. **Parameters**: length, temperature, top-p, top-k, repetition penalty and seed of the current "
            "conversation, or a preset.\n"
            "3. **Models**: what is loaded and what else can be. The operator switches model and precision "
            "(FP32, BF16, FP16, INT8, INT4) without restarting.\n"
            "4. **Benchmark**: what each precision costs and saves on this machine (the operator runs them).")
        st.page_link("app_pages/chat.py", label="Start chatting", icon=":material/chat:")

    gate()
    visitor()
    runtime.models()   # the start-up model loads as soon as the first visitor arrives, if the server has not yet
    operator_sign_in()
    pages = [
        st.Page(home, title="Home", icon=":material/home:", default=True),
        st.Page("app_pages/chat.py", title="Chat", icon=":material/chat:"),
        st.Page("app_pages/parameters.py", title="Parameters", icon=":material/tune:"),
        st.Page("app_pages/models.py", title="Models", icon=":material/memory:"),
        st.Page("app_pages/benchmark.py", title="Benchmark", icon=":material/speed:"),
    ]
    st.navigation(pages).run()
