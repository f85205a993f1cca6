"""A client for an OpenAI-compatible chat server: vLLM or SGLang (ChatGLM2/3, GLM-4), llama.cpp's server,
llama-cpp-python's server or Ollama (GGUF models): a model choice that is a base URL, a model name and a key.

Standard library only (http.client): a stream is read line by line as it arrives, and a Stop closes the
socket from a watcher thread, so a server that is slow to send its next chunk is left at once; the server then
sees the client go and frees its slot.

Base URL: `http://gpu-box:8000/v1`, `http://gpu-box:8000/v1/`, `http://gpu-box:8000` and `gpu-box:8000` all
mean the same server: a URL with no path gets `/v1` (where vLLM, SGLang, llama.cpp and Ollama all serve the
API); a URL with a path is used as written (a proxy's prefix such as `https://host/llm/v1`). No scheme means
http. Proxy variables in the environment are not used (the servers are on the LAN).

Not sent: `max_length` (the server applies its own context). Not filled in ReplyStats: `token_ids` (a server
sends text, not ids), `wait_s` (a server's own queue is part of ttft_s here) and `dropped_turns`.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from .generate import GenerationParams, ReplyStats


class RemoteError(RuntimeError):
    """A remote server could not give a reply; the message says why in words a user can act on."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status   # the HTTP status when the server answered with one


@dataclass
class RemoteServer:
    base_url: str          # http://gpu-box:8000/v1, with or without /v1 (see the module doc)
    api_key: str = ""      # sent as "Authorization: Bearer KEY" when not empty
    timeout_s: float = 60  # to connect, and the longest wait for the next bytes of an answer

    def __post_init__(self):
        text = self.base_url.strip()
        if "://" not in text:
            text = "http://" + text
        url = urlsplit(text)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise RemoteError(f"{self.base_url!r} is not a server address: give e.g. http://gpu-box:8000/v1")
        try:
            port = url.port
        except ValueError:
            raise RemoteError(f"{self.base_url!r} has a port that is not a number") from None
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/") or "/v1"
        self.base_url = f"{url.scheme}://{url.netloc}{self._prefix}"

    # ---- the two calls

    def models(self) -> list[str]:
        """The model ids the server offers (GET {base}/models)."""
        conn, _ = self._connect()
        try:
            resp = self._request(conn, "GET", "/models", None)
            body = self._read_json(resp, "the model list")
        finally:
            conn.close()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise RemoteError(f"{self.base_url}/models did not answer with a model list (no \"data\" list): "
                              f"is this an OpenAI-compatible API? {_short(body)}")
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id") is not None]

    def stream_chat(self, model: str, messages: list[dict], params: GenerationParams | None = None,
                    stop: threading.Event | None = None, stats: ReplyStats | None = None) -> Iterator[str]:
        """Yield the text deltas of one reply (POST {base}/chat/completions, stream=true), filling `stats` as
        they come: prompt_tokens/new_tokens (the server's usage when it sends one, else one a chunk), ttft_s and
        decode_tok_s timed here, finish_reason stop | length | stopped. `stop` ends the reply within about one
        chunk with "stopped". Any failure raises RemoteError (finish_reason "error")."""
        params = params or GenerationParams()
        stats = stats if stats is not None else ReplyStats()
        stats.finish_reason = ""
        started = time.perf_counter()
        if stop is not None and stop.is_set():
            stats.finish_reason = "stopped"
            return
        body = self.request_body(model, messages, params)
        try:
            yield from self._stream(model, body, stop, stats, started)
        except RemoteError:
            stats.finish_reason = "error"
            raise

    @staticmethod
    def request_body(model: str, messages: list[dict], params: GenerationParams) -> dict:
        """The JSON of a streamed chat request for GenerationParams."""
        body: dict = {"model": model, "messages": messages, "stream": True,
                      "stream_options": {"include_usage": True}, "max_tokens": params.max_new_tokens}
        if params.do_sample:
            body["temperature"], body["top_p"] = params.temperature, params.top_p
            if params.top_k and params.top_k > 0:
                body["top_k"] = params.top_k          # an extra field: vLLM, SGLang, llama.cpp, Ollama
        else:
            body["temperature"] = 0                   # greedy
        if params.repetition_penalty and params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty   # vLLM, SGLang
            body["repeat_penalty"] = params.repetition_penalty       # llama.cpp, llama-cpp-python
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    # ---- streaming

    def _stream(self, model: str, body: dict, stop, stats: ReplyStats, started: float) -> Iterator[str]:
        try:
            conn, sock = self._connect()    # Stop cannot cut a connect short: at most timeout_s
        except RemoteError:
            if stop is not None and stop.is_set():
                stats.finish_reason = "stopped"
                return
            raise
        done = threading.Event()
        if stop is not None:
            threading.Thread(target=_close_on_stop, args=(stop, done, sock), daemon=True,
                             name="remote-stop").start()
        try:
            resp = self._request(conn, "POST", "/chat/completions", body, stop)
            if resp.status == 400 and "stream_options" in body:
                message = _error_message(resp.read())
                if "stream_options" in message:        # a server that predates usage in streams: ask without it
                    conn.close()
                    body = {k: v for k, v in body.items() if k != "stream_options"}
                    yield from self._stream(model, body, stop, stats, started)
                    return
                raise self._status_error(400, message, f"model {model!r}")
            if resp.status != 200:
                raise self._status_error(resp.status, _error_message(resp.read()), f"model {model!r}")
            if "text/event-stream" not in (resp.getheader("Content-Type") or ""):
                # a server that ignored stream=true: the whole reply in one JSON
                yield from self._whole_reply(self._read_json(resp, "the reply"), stats, started)
                return
            first = last = None
            chunks = events = 0
            usage = None
            reason = None
            for event, data in _sse_events(resp, self):
                if stop is not None and stop.is_set():
                    break
                if data == "[DONE]":
                    break
                obj = _parse_event(event, data)
                events += 1
                if obj.get("usage"):
                    usage = obj["usage"]
                for choice in obj.get("choices") or []:
                    if not isinstance(choice, dict):
                        continue
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if text:
                        now = time.perf_counter()
                        chunks += 1
                        if first is None:
                            first = now
                            stats.ttft_s = now - started
                        last = now
                        stats.new_tokens = chunks
                        if now > first:
                            stats.decode_tok_s = (chunks - 1) / (now - first)
                        yield text
                        if stop is not None and stop.is_set():
                            break
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                if stop is not None and stop.is_set():
                    break
            if stop is not None and stop.is_set():
                stats.finish_reason = "stopped"
            elif reason is None and not events:
                raise RemoteError(f"{self.base_url} ended the stream without sending a reply: it failed on the "
                                  f"request (llama-cpp-python does this for a prompt longer than its context); "
                                  f"the server's log says why")
            elif reason is None:
                raise RemoteError(f"{self.base_url} ended the stream before the reply finished "
                                  f"(no finish_reason): the server may have crashed or been stopped")
            elif reason == "length":
                stats.finish_reason = "length"
            elif reason == "abort":
                raise RemoteError(f"{self.base_url} aborted the reply (finish_reason \"abort\")")
            else:
                stats.finish_reason = "stop"   # stop, eos, tool_calls, content_filter ...
            if isinstance(usage, dict):
                if isinstance(usage.get("prompt_tokens"), int):
                    stats.prompt_tokens = usage["prompt_tokens"]
                if isinstance(usage.get("completion_tokens"), int) and usage["completion_tokens"] >= chunks:
                    stats.new_tokens = usage["completion_tokens"]
            if first is not None and last is not None and last > first:
                stats.decode_tok_s = (stats.new_tokens - 1) / (last - first)
            if stats.prompt_tokens and stats.ttft_s > 0:
                stats.prefill_tok_s = stats.prompt_tokens / stats.ttft_s
        except (OSError, http.client.HTTPException) as e:
            if stop is not None and stop.is_set():
                stats.finish_reason = "stopped"     # our own close of the socket
                return
            raise self._net_error(e) from None
        finally:
            done.set()
            conn.close()

    def _whole_reply(self, obj, stats: ReplyStats, started: float) -> Iterator[str]:
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise RemoteError(f"{self.base_url} answered without a reply: {_short(obj)}")
        message = choices[0].get("message") or {}
        text = message.get("content") or ""
        stats.ttft_s = time.perf_counter() - started
        usage = obj.get("usage") or {}
        stats.prompt_tokens = usage.get("prompt_tokens") or 0
        stats.new_tokens = usage.get("completion_tokens") or (1 if text else 0)
        stats.finish_reason = "length" if choices[0].get("finish_reason") == "length" else "stop"
        if text:
            yield text

    # ---- HTTP

    def _connect(self) -> tuple[http.client.HTTPConnection, socket.socket]:
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._net_error(e) from None
        return conn, conn.sock

    def _request(self, conn, method: str, path: str, body: dict | None, stop=None) -> http.client.HTTPResponse:
        headers = {"Accept": "text/event-stream" if body and body.get("stream") else "application/json",
                   "User-Agent": "GLM-Studio"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            if stop is not None and stop.is_set():
                raise
            raise self._net_error(e) from None

    def _read_json(self, resp: http.client.HTTPResponse, what: str):
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise self._net_error(e) from None
        if resp.status != 200:
            raise self._status_error(resp.status, _error_message(raw), what)
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteError(f"{self.base_url} answered {what} with something that is not JSON: "
                              f"is this an OpenAI-compatible API? {_short(raw)}") from None

    def _status_error(self, status: int, message: str, what: str) -> RemoteError:
        said = f": {message}" if message else ""
        if status in (401, 403):
            text = (f"{self.base_url} refused the API key ({status}{said}): "
                    + ("give the server's key" if not self.api_key else "check the key"))
        elif status == 404:
            if what.startswith("model ") and message and message.lower() not in ("not found", "404 not found"):
                text = f"{self.base_url} has no {what} (404{said}): pick one of the server's models"
            else:
                text = f"{self.base_url} has no OpenAI API there (404{said}): check the base URL (often ends in /v1)"
        elif status == 400:
            text = f"{self.base_url} rejected the request for {what} (400{said})"
        elif status == 429:
            text = f"{self.base_url} is busy (429{said}): try again later"
        elif status >= 500:
            text = f"{self.base_url} failed on {what} ({status}{said})"
        else:
            text = f"{self.base_url} answered {what} with HTTP {status}{said}"
        return RemoteError(text, status)

    def _net_error(self, e: BaseException) -> RemoteError:
        where = f"{self._host}:{self._port}"
        if isinstance(e, (socket.timeout, TimeoutError)):
            return RemoteError(f"{where} did not answer within {self.timeout_s:g} s (timed out)")
        if isinstance(e, socket.gaierror):
            return RemoteError(f"cannot find the host {self._host!r} (name lookup failed: {e.strerror or e})")
        if isinstance(e, ConnectionRefusedError):
            return RemoteError(f"cannot reach {where}: connection refused (is the server running on that port?)")
        if isinstance(e, ssl.SSLError):
            return RemoteError(f"TLS with {where} failed: {e}")
        if isinstance(e, (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead)):
            return RemoteError(f"{where} closed the connection mid-answer ({type(e).__name__}): "
                               "the server may have crashed or been stopped")
        if isinstance(e, http.client.HTTPException):
            return RemoteError(f"{where} sent a malformed HTTP answer ({type(e).__name__}: {e})")
        return RemoteError(f"cannot reach {where}: {e.strerror or e}" if isinstance(e, OSError) else str(e))


def _close_on_stop(stop: threading.Event, done: threading.Event, sock) -> None:
    """Watcher: when Stop is pressed, shut the socket so a read blocked on a slow server returns at once."""
    while not done.is_set():
        if stop.wait(0.05):
            if not done.is_set():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return


def _sse_events(resp, server: RemoteServer) -> Iterator[tuple[str, str]]:
    """(event type, data) of each server-sent event: data lines joined, comments (keep-alives) skipped."""
    event, data = "", []
    while True:
        raw = resp.readline(1 << 20)
        if not raw:
            break
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise RemoteError(f"{server.base_url} sent a stream line that is not UTF-8 (malformed stream)") from None
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            if data and value == "[DONE]":     # a server that leaves out the blank line between events
                yield event, "\n".join(data)
                event, data = "", []
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


def _parse_event(event: str, data: str) -> dict:
    try:
        obj = json.loads(data)
    except ValueError:
        # data lines without blank lines between them: one JSON a line, kept when each parses alone
        parts = []
        for piece in data.split("\n"):
            try:
                parts.append(json.loads(piece))
            except ValueError:
                if event == "error":
                    raise RemoteError(f"the server reported an error mid-reply: {_short(data)}") from None
                raise RemoteError(f"malformed stream from the server: {_short(data)} is not JSON") from None
        obj = _merge(parts)
    if not isinstance(obj, dict):
        raise RemoteError(f"malformed stream from the server: {_short(data)} is not a JSON object")
    message = _error_in(obj) or (_short(obj) if event == "error" else "")
    if message:
        raise RemoteError(f"the server reported an error mid-reply: {message}")
    return obj


def _merge(parts: list) -> dict:
    """Several chunks that came as one event: their choices in order, the last usage."""
    out: dict = {"choices": []}
    for p in parts:
        if not isinstance(p, dict):
            raise RemoteError(f"malformed stream from the server: {_short(p)} is not a JSON object")
        if _error_in(p):
            return p
        out["choices"].extend(p.get("choices") or [])
        if p.get("usage"):
            out["usage"] = p["usage"]
    return out


def _error_in(obj: dict) -> str:
    """The message of an error object: OpenAI's {"error": {...}} or vLLM's {"object": "error", ...}."""
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("msg") or _short(err))
    if isinstance(err, str) and err:
        return err
    if obj.get("object") == "error":
        return str(obj.get("message") or _short(obj))
    return ""


def _error_message(raw: bytes) -> str:
    """The message in an error answer's body: JSON error objects (OpenAI, vLLM, FastAPI) or short text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return _short(text)
    if isinstance(obj, dict):
        message = _error_in(obj)
        if message:
            return _short(message, 300)
        detail = obj.get("detail")               # FastAPI's {"detail": ...}
        if detail:
            if isinstance(detail, list):        # pydantic validation errors
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                                   if isinstance(d, dict) else str(d) for d in detail)
            return _short(str(detail), 300)
    return _short(text)


def _short(x, n: int = 200) -> str:
    text = x.decode("utf-8", "replace") if isinstance(x, bytes) else x if isinstance(x, str) else json.dumps(x)
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"
