"""The OpenAI-compatible HTTP API, served by Streamlit's own server beside the pages (a route of `st.App`), or
alone by `python -m glm_core serve MODEL`.

    GET  /v1/models
    POST /v1/chat/completions   (stream or not; temperature, top_p, max_tokens, stop, seed, user; usage)

Requests go through the same chat turn and the same model service as the browser visitors: they are batched and
queued with them. A client that disconnects cancels its request. Keys: `Authorization: Bearer <key>` with a key of
GLM_STUDIO_API_KEYS (comma-separated) or the operator's secret; with no API key set, only clients on this machine
(loopback) are answered. With `user` set, the exchange is kept as a conversation owned by the key ("API · user"),
which the operator can read. Errors follow OpenAI's format: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import ip_address

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from glm_core import GenerationParams, PromptTooLongError
from glm_core.service import ServiceBusy

from . import runtime
from .chat import ChatError, first_stop

log = logging.getLogger(__name__)
POLL_S = 0.02                 # how often a response looks for new text
MAX_BODY_BYTES = 8 << 20      # a request body beyond this is refused (413) before it is read whole
ROLES = ("system", "user", "assistant", "observation")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def api_keys() -> list[str]:
    return [k.strip() for k in os.environ.get("GLM_STUDIO_API_KEYS", "").split(",") if k.strip()]


def is_loopback(host: str | None) -> bool:
    try:
        address = ip_address((host or "").removeprefix("::ffff:"))
    except ValueError:
        return False
    return address.is_loopback


def caller(request: HttpRequest) -> str:
    """The owner the request acts as: its key (hashed: the owner id must not reveal it), or the local machine."""
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    keys = api_keys() + [runtime.access().operator_secret]
    if given:
        if any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
            return "api-" + hashlib.sha256(given.encode()).hexdigest()[:16]
        raise ApiError(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
    if not api_keys() and is_loopback(request.client.host if request.client else None):
        return "api-local"
    raise ApiError(401, "An API key is needed: Authorization: Bearer <key> (GLM_STUDIO_API_KEYS or the operator's "
                        "secret); without keys set, only this machine may call.", code="invalid_api_key")


def served_model() -> str:
    engine = runtime.models().engine
    if engine is None:
        status = runtime.models().status
        reason = "it is loading" if runtime.models().loading else (status.error or "none is loaded")
        raise ApiError(503, f"No model is ready: {reason}.", "server_error", code="model_not_loaded")
    return engine.name


# -- parameters -----------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    params: GenerationParams
    stop: list[str]
    stream: bool
    include_usage: bool
    user: str | None


def number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or not (low <= value <= high):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {kind} from {low:g} to {high:g}; got {value!r}"[:300], param=key)
    return value


def text_of(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which the text ones are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def parse(body: object) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: GET /v1/models lists it", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}", param="messages")
        clean.append({"role": m["role"], "content": text_of(m.get("content"), f"messages[{i}]")})
    if clean[-1]["role"] not in ("user", "observation"):
        raise ApiError(400, "the last message must be the user's", param="messages")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1)
    max_tokens = number(body, "max_tokens", 1, 1 << 20, integer=True) or number(
        body, "max_completion_tokens", 1, 1 << 20, integer=True)
    seed = number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    engine = runtime.models().engine
    base = engine.default_params.to_dict() if engine is not None else GenerationParams().to_dict()
    settings = {**base, "max_length": None}
    if temperature is not None:
        settings.update(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0)
    if top_p is not None:
        if top_p == 0:
            raise ApiError(400, "top_p must be above 0", param="top_p")
        settings["top_p"] = top_p
    if max_tokens is not None:
        settings["max_new_tokens"] = max_tokens
    if seed is not None:
        settings["seed"] = seed % (1 << 63)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user.strip() or len(user) > 200):
        raise ApiError(400, "user must be a non-empty string of at most 200 characters", param="user")
    return ChatRequest(model, clean, GenerationParams(**settings), stop, stream,
                       bool(isinstance(options, dict) and options.get("include_usage")), user)


# -- answering --------------------------------------------------------------------------------------------


class StopStrings:
    """Text as it streams, cut before the first stop string; text that may start one is held back until known."""

    def __init__(self, stops: list[str]):
        self.stops, self.sent, self.hit = stops, 0, False

    def release(self, text: str, final: bool) -> str:
        cut = first_stop(text, self.stops)
        if cut >= 0:
            self.hit, end = True, cut
        elif final or not self.stops:
            end = len(text)
        else:   # hold back a tail that could be the start of a stop string
            hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            end = len(text) - hold
        delta, self.sent = text[self.sent:max(end, self.sent)], max(end, self.sent)
        return delta


async def text_deltas(request, stops: StopStrings, disconnected) -> AsyncIterator[str]:
    """The reply's pieces as the model wrote them, a delta each (stop strings applied), until it ends; the reply
    is cancelled if the client goes (`disconnected()` says so) or a stop string ends it."""
    sent, written = 0, ""
    try:
        while True:
            if await disconnected():
                request.cancel()
                return
            done = request.done   # read before the pieces: once done, every piece is there
            new = request.pieces[sent:]
            sent += len(new)
            for piece in new:
                written += piece
                if delta := stops.release(written, final=False):
                    yield delta
                if stops.hit:
                    request.cancel()
                    return
            if done:
                if delta := stops.release(written, final=True):   # a tail held back for a stop string
                    yield delta
                return
            if not new:
                await asyncio.sleep(POLL_S)
    finally:
        if not request.done and not stops.hit:
            request.cancel()   # the client went away (the response was cancelled)


def finish_reason(request, stops: StopStrings) -> str:
    if stops.hit or request.finish_reason == "stop":
        return "stop"
    return "length" if request.finish_reason == "length" else "stop"


def usage(request) -> dict:
    stats = request.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


async def read_body(http: HttpRequest) -> bytes:
    too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for part in http.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    return bytes(body)


async def models_route(http: HttpRequest) -> JSONResponse:
    try:
        caller(http)
        name = served_model()
    except ApiError as e:
        return e.response()
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                     "owned_by": "glm-studio"}]})


async def chat_route(http: HttpRequest):
    try:
        owner = caller(http)
        try:
            body = json.loads(await read_body(http))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON (or is nested too deeply)") from None
        asked = parse(body)
        name = served_model()
        if asked.model != name:
            raise ApiError(404, f"The model {asked.model!r} does not exist here; this server runs {name!r}.",
                           param="model", code="model_not_found")
        try:
            turn = runtime.chat().reply_to(owner, asked.messages, asked.params, log_as=asked.user,
                                              stop_strings=asked.stop)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ChatError as e:
            raise ApiError(400, str(e), param="messages") from None
        except ServiceBusy as e:
            raise ApiError(503, str(e), "server_error", code="overloaded") from None
    except ApiError as e:
        return e.response()
    request, stops = turn.request, StopStrings(asked.stop)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, reason: str | None = None, with_usage: bool = False) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        if with_usage:
            body = {**body, "choices": [], "usage": usage(request)}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    if asked.stream:
        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for delta in text_deltas(request, stops, http.is_disconnected):
                yield chunk({"content": delta})
            if request.error and not stops.hit:
                body = {"error": {"message": request.error, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(body)}\n\n"
            else:
                yield chunk({}, finish_reason(request, stops))
                if asked.include_usage:
                    yield chunk({}, with_usage=True)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    text = "".join([delta async for delta in text_deltas(request, stops, http.is_disconnected)])
    if request.error and not stops.hit:
        return ApiError(500, request.error, "server_error").response()
    if not request.done and not stops.hit:   # the client disconnected
        return JSONResponse({}, status_code=499)
    return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish_reason(request, stops)}],
                         "usage": usage(request)})


def routes() -> list:
    return [Route("/v1/models", models_route, methods=["GET"]),
            Route("/v1/chat/completions", chat_route, methods=["POST"])]


def serve_api(model: str, precision: str, device: str, host: str, port: int) -> int:
    """The API alone (no pages): `python -m glm_core serve MODEL`."""
    import uvicorn
    from starlette.applications import Starlette
    os.environ.update(GLM_STUDIO_MODEL=model, GLM_STUDIO_PRECISION=precision, GLM_STUDIO_DEVICE=device)
    models = runtime.models()
    if not is_loopback(host) and not api_keys():
        print("error: without GLM_STUDIO_API_KEYS the API answers this machine only; set keys to listen on "
              f"{host}", flush=True)
        return 2
    print(f"GLM Studio API on http://{host}:{port}/v1 · loading {model} ({precision}, {device})", flush=True)
    try:
        models.wait_loaded()
    except Exception as e:  # noqa: BLE001 - said on the terminal
        print(f"error: {e}", flush=True)
        return 1
    uvicorn.run(Starlette(routes=routes()), host=host, port=port, log_level="warning")
    return 0
