"""What GLM Studio puts in front of Streamlit's own server (`st.App` in Home.py): the HTTP API's routes, signed
visitor cookies, a start-up that loads the model and tells the operator how to sign in, and error ids."""
from __future__ import annotations

import logging
import sys
import uuid
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie

from starlette.middleware import Middleware

from . import runtime
from .access import VISITOR_COOKIE

log = logging.getLogger("glm_studio")
COOKIE_MAX_AGE_S = 365 * 24 * 3600


def routes() -> list:
    from . import api
    return api.routes()


class VisitorCookies:
    """Give each browser a visitor cookie signed with the server secret, HttpOnly (page scripts cannot read or
    copy it); a missing, unsigned or forged one is replaced by a new visitor's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cookies = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                try:
                    cookies.load(value.decode("latin-1"))
                except Exception:  # noqa: BLE001 - a malformed Cookie header: a new visitor
                    cookies = SimpleCookie()
        given = cookies.get(VISITOR_COOKIE)
        access = runtime.access()
        if given is not None and access.visitor_from_cookie(given.value):
            return await self.app(scope, receive, send)
        _, value = access.visitor_cookie()
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        header = (f"{VISITOR_COOKIE}={value}; Max-Age={COOKIE_MAX_AGE_S}; Path=/; HttpOnly; SameSite=Lax{secure}")

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"set-cookie", header.encode("latin-1"))]
            await send(message)
        await self.app(scope, receive, send_with_cookie)


def middleware() -> list:
    return [Middleware(VisitorCookies)]


@asynccontextmanager
async def lifespan(_app):
    """At start: open the store, start loading the model, and print how the operator signs in."""
    import streamlit as st
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime.store()
    runtime.models()
    access = runtime.access()
    if access.token_file is not None:
        how = f"{access.operator_link(st.get_option('server.port'))} (the token is also in {access.token_file})"
    else:
        how = "the GLM_STUDIO_ADMIN_PASSWORD it was started with"
    print(f"\n  GLM Studio operator sign-in: {how}\n", file=sys.stderr, flush=True)
    yield


def on_script_error(exc: BaseException) -> bool:
    """A page failed: the visitor sees an error id and no details; the server log keeps the traceback."""
    import streamlit as st
    error_id = uuid.uuid4().hex[:8]
    log.error("page error %s", error_id, exc_info=exc)
    st.error(f"Something went wrong on this page (error {error_id}). The server's log has the details.")
    return True
