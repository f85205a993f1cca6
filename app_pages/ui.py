"""What every page shares: the visitor, their role, the sign-in gate, and showing untrusted text safely."""
from __future__ import annotations

import uuid

import psutil
import streamlit as st

from app import runtime
from app.access import VISITOR_COOKIE
from app.safe_markdown import model_markdown, plain_text
from storage import NewerSchemaError, Store

__all__ = ["model_markdown", "plain_text"]


def client_address() -> str:
    return st.context.ip_address or "unknown"


def visitor() -> str:
    """This browser's visitor id: the one its signed cookie names, else one for this session only (a forged or
    unsigned cookie is a new visitor)."""
    access = runtime.access()
    named = access.visitor_from_cookie(st.context.cookies.get(VISITOR_COOKIE))
    if named is None:
        named = st.session_state.setdefault("visitor", uuid.uuid4().hex)
    access.seen(named)
    return named


def is_operator() -> bool:
    return st.session_state.get("role") == "operator"


def sign_in(given: str, operator_only: bool = False) -> bool:
    """Check a password (with the per-client slow-down) and take the role it gives; say why on failure."""
    access, client = runtime.access(), client_address()
    refused = access.guesses.wait_s(client) > 0   # tried inside the wait earlier guesses earned: not checked
    role, wait = access.sign_in(client, given, operator_only)
    if role is not None:
        st.session_state.role = role
        return True
    if refused:
        st.error(f"Too many wrong passwords from this address: try again in {wait:.0f} s.")
    elif wait > 0:   # checked, and the last free guess: the wait starts now
        st.error(f"Wrong password. You can try again in {wait:.0f} s.")
    else:
        st.error("Wrong password.")
    return False


def gate() -> None:
    """Every page stops here until the visitor may see it: the access password when one is set (the operator's
    secret opens it too). A `?operator=` link signs the operator in."""
    given = st.query_params.get("operator")
    if given is not None:
        del st.query_params["operator"]
        sign_in(given, operator_only=True)
    if not runtime.access().guest_password or st.session_state.get("role") in ("guest", "operator"):
        st.session_state.setdefault("role", "guest")
        return
    st.title("GLM Studio")
    with st.form("login"):
        given = st.text_input("Access password", type="password")
        if st.form_submit_button("Enter", type="primary") and sign_in(given):
            st.rerun()
    st.stop()


def operator_sign_in() -> None:
    """The sidebar's operator sign-in (or sign-out)."""
    with st.sidebar:
        if is_operator():
            if st.button("Sign out as operator", icon=":material/logout:"):
                st.session_state.role = "guest"
                st.rerun()
            return
        with st.expander("Operator", icon=":material/admin_panel_settings:"):
            with st.form("operator-login", border=False):
                given = st.text_input("Operator password or token", type="password",
                                      help="GLM_STUDIO_ADMIN_PASSWORD, or the token the server printed at start")
                if st.form_submit_button("Sign in") and sign_in(given, operator_only=True):
                    st.rerun()


def store_or_stop() -> Store:
    try:
        store = runtime.store()
    except NewerSchemaError as e:
        st.error(plain_text(f"The history database cannot be opened: {e}"))
        st.stop()
    if store.recovered_from is not None and not st.session_state.get("told_recovery"):
        st.session_state.told_recovery = True
        st.warning(plain_text(f"The history database was damaged. It was moved aside to {store.recovered_from} "
                              f"and a fresh one was started at {store.path}."))
    return store


def error(text: str, **kwargs) -> None:
    """An error message whose text may come from anyone: shown as text, never as markup."""
    st.error(plain_text(text), **kwargs)


def lan_urls() -> list[str]:
    """http://<address>:<port> for every IPv4 address of this machine but loopback."""
    port = st.get_option("server.port")
    return [f"http://{a.address}:{port}" for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family.name == "AF_INET" and not a.address.startswith("127.")]
