"""The OpenAI-compatible API as its users call it: the official `openai` client against a real server (the API is a
route of the Streamlit server), beside a browser visitor; and GLM Studio as the client of another server's API."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import openai
import pytest
from playwright.sync_api import expect

from app import api
from conftest import ROOT
from e2e import ARTIFACTS, OPERATOR_SECRET, browser, free_port, streamlit_server
from glm_core import GenerationParams
from test_e2e_app import LONG, last_reply, open_page, send, short_replies
from test_service import serving

KEY = "test-key-1"
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def wait_for_the_model(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
    deadline = time.time() + 180
    while True:   # the model loads as the server starts
        try:
            client.models.list()
            return
        except openai.APIStatusError as e:
            if e.status_code != 503 or time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def server():
    with streamlit_server(env={"GLM_STUDIO_API_KEYS": f"{KEY},another-key", "GLM_STUDIO_MAX_BATCH": "3"}) as url:
        wait_for_the_model(url)
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_models_lists_the_loaded_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_reply_whole_with_usage(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_reply_streamed_one_delta_at_a_time(client):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    deltas, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert "Paris" in "".join(deltas)
    assert reasons == [reasons[0]] and reasons[0] in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert len(deltas) >= usage.completion_tokens - 1   # a chunk a token, however fast the model writes
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == "".join(deltas)   # greedy: the same reply either way


def test_a_stream_sends_each_piece_once_written_and_cuts_at_a_stop_string(embedded_engine):
    """The reply has ended before the stream looks (a fast model, a slow poll): still a delta a piece, and a stop
    string cuts the text even when it spans pieces."""
    service = serving(embedded_engine)
    try:
        request = service.submit([{"role": "user", "content": "Count from one to ten in words."}],
                                 GenerationParams(max_new_tokens=24, do_sample=False)).result(timeout=120)
    finally:
        service.close()

    async def connected():
        return False

    def streamed(stops):
        async def collect():
            return [delta async for delta in api.text_deltas(request, api.StopStrings(stops), connected)]
        return asyncio.run(collect())

    assert streamed([]) == request.pieces and len(request.pieces) >= request.stats.new_tokens - 1 >= 3
    stop = request.text[len(request.pieces[0]) - 1:len(request.pieces[0]) + 2]   # across the first two pieces
    cut = streamed([stop])
    assert "".join(cut) == request.text[:request.text.index(stop)] and len(cut) <= 2


def test_stop_strings_seed_and_top_p(client):
    story = [{"role": "user", "content": "Write three short lines about cats, one per line."}]
    cut = client.chat.completions.create(model=MODEL, messages=story, temperature=0, max_tokens=60, stop=["\n"])
    assert "\n" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL, messages=story, temperature=1.0, top_p=0.9, seed=42,
                                              max_tokens=20).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_errors_in_openais_format(server, client):
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.chat.completions.create(model=MODEL, messages=QUESTION)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as e:   # no key at all (the openai client always sends one)
        urllib.request.urlopen(f"{server}/v1/models")
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert e.value.code == "model_not_found"
    history = [{"role": role, "content": f"{i} " + "story " * 3000} for i, role in
               enumerate(["user", "assistant", "user", "assistant", "user"])]   # about 15,000 tokens, 8,192 fit
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=history)
    assert e.value.code == "context_length_exceeded" and "tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}])
    assert "GLM_STUDIO_MAX_INPUT_CHARS" in str(e.value)
    for bad in ({"temperature": 5}, {"top_p": -1}, {"max_tokens": 0}, {"stop": ["a"] * 5}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=QUESTION, **bad)
        assert e.value.param == next(iter(bad))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.param == "messages"


def test_a_body_too_big_or_too_deep_is_refused(server):
    def post(body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{server}/v1/chat/completions", data=body, method="POST", headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    # a body declared over the limit is refused before it is read: send the headers and a little of it only (a
    # client that kept sending would see the connection closed under it)
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {9 << 20}\r\n\r\n".encode() + b" " * 1024)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = conn.recv(65536)
            if not part:
                break
            answer += part
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(payload)["error"]["code"] == "request_too_large"
    status, body = post(b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "JSON" in body["error"]["message"]


def test_a_full_server_says_overloaded_and_clients_that_go_away_free_their_places():
    """One place in the batch and one in line: a third request is refused with 503 overloaded; once the two
    streams disconnect, a new request is answered at once (undisconnected, their 2000-token stories would hold
    both places for minutes)."""
    story = [{"role": "user", "content": "Write a very long story about a dragon, with many chapters."}]
    with streamlit_server(env={"GLM_STUDIO_API_KEYS": KEY, "GLM_STUDIO_MAX_BATCH": "1",
                               "GLM_STUDIO_MAX_QUEUE": "1"}) as url:
        wait_for_the_model(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        running = client.chat.completions.create(model=MODEL, messages=story, max_tokens=2000, stream=True)
        next(chunk for chunk in running if chunk.choices and chunk.choices[0].delta.content)   # in the batch now
        waiting = client.chat.completions.create(model=MODEL, messages=story, max_tokens=2000, stream=True)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
        assert e.value.status_code == 503 and e.value.code == "overloaded"
        running.close()
        waiting.close()
        start = time.time()
        while True:   # the server notices a disconnect within a poll
            try:
                reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
                break
            except openai.APIStatusError as e:
                assert e.status_code == 503 and time.time() - start < 5, "the abandoned streams kept their places"
                time.sleep(0.2)
        assert reply.choices[0].message.content and time.time() - start < 30


def test_no_model_loaded_is_503_with_the_reason(tmp_path):
    with streamlit_server(env={"GLM_STUDIO_API_KEYS": KEY, "GLM_STUDIO_MODEL": str(tmp_path / "no-such-model")}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
            assert e.value.status_code == 503 and e.value.code == "model_not_loaded"
            if "loading" not in str(e.value):
                break
            assert time.time() < deadline
            time.sleep(0.5)
        assert "no-such-model" in str(e.value)


def kept_exchange(user: str) -> tuple[dict, list[dict]]:
    """The conversation an API call with `user` was kept in, and its messages once the reply is saved."""
    from storage import EVERYONE, Store
    store = Store(os.environ["GLM_STUDIO_DB"])
    try:
        conversation = next(c for c in store.list_conversations(EVERYONE) if c["title"] == f"API · {user}")
        deadline = time.time() + 30
        while (messages := store.messages(conversation["id"], EVERYONE))[-1]["finish_reason"] is None:
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        store.close()
    return conversation, messages


def test_the_user_field_keeps_the_exchange_for_the_operator(server, client):
    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, user="alice")
    conversation, messages = kept_exchange("alice")
    assert conversation["owner"].startswith("api-") and KEY not in conversation["owner"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"]
    operator = openai.OpenAI(base_url=f"{server}/v1", api_key=OPERATOR_SECRET, max_retries=0)
    assert operator.models.list().data   # the operator's secret is a key too


def test_a_kept_exchange_ends_where_the_stop_string_ended_the_reply(server, client):
    story = [{"role": "user", "content": "Write three short lines about cats, one per line."}]
    cut = client.chat.completions.create(model=MODEL, messages=story, temperature=0, max_tokens=60, stop=["\n"],
                                         user="bob")
    assert cut.choices[0].finish_reason == "stop"
    _, messages = kept_exchange("bob")
    assert (messages[-1]["content"], messages[-1]["finish_reason"]) == (cut.choices[0].message.content, "stop")


def test_two_api_streams_and_a_browser_visitor_at_once(server, client):
    pieces: dict[str, list[float]] = {"a": [], "b": []}

    def stream(name: str) -> None:
        s = client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": f"Write a poem about the number {name}, in many lines."}],
            max_tokens=80, temperature=0, stream=True)
        for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces[name].append(time.time())
    threads = [threading.Thread(target=stream, args=(n,)) for n in pieces]
    with browser() as chromium:
        page = open_page(chromium, server, "chat")
        short_replies(page, 60)
        for t in threads:
            t.start()
        send(page, "Write a poem about rivers, in many lines.")
        expect(last_reply(page).get_by_test_id("stCaptionContainer")).to_contain_text("tokens", timeout=LONG)
        for t in threads:
            t.join(300)
    a, b = pieces["a"], pieces["b"]
    assert len(a) > 10 and len(b) > 10
    overlap = min(a[-1], b[-1]) - max(a[0], b[0])
    assert overlap > 0, "the two API streams ran one after the other"


def test_callers_without_a_key_are_refused_unless_local(monkeypatch):
    from app import api
    monkeypatch.delenv("GLM_STUDIO_API_KEYS", raising=False)

    def request(host: str, key: str = "") -> SimpleNamespace:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return SimpleNamespace(headers=headers, client=SimpleNamespace(host=host))
    assert api.caller(request("127.0.0.1")) == "api-local"
    assert api.caller(request("::ffff:127.0.0.1")) == "api-local"
    with pytest.raises(api.ApiError) as e:
        api.caller(request("192.168.1.20"))
    assert e.value.status == 401
    monkeypatch.setenv("GLM_STUDIO_API_KEYS", "k1")
    with pytest.raises(api.ApiError):
        api.caller(request("127.0.0.1"))          # with keys set, a key is needed from anywhere
    assert api.caller(request("192.168.1.20", "k1")).startswith("api-")


@pytest.fixture(scope="module")
def second_glm_studio():
    """`python -m glm_core serve` on another loopback port: another machine's GLM Studio, as far as the client knows."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "glm_core", "serve", MODEL, "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "GLM_STUDIO_API_KEYS": "remote-key"}, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        client = openai.OpenAI(base_url=url, api_key="remote-key", max_retries=0)
        deadline = time.time() + 240
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, "the API server did not start"
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def chat_through_remote(base_url: str, model: str, api_key: str, store_path) -> None:
    """A chat turn through another server's model: streamed, stopped, saved with its stats, as with a local one."""
    import glm_core
    from app.chat import ChatService
    from glm_core.engines import remote_name
    from glm_core.service import ModelService
    from storage import Store
    models = ModelService(remote_name(base_url, model), "remote", "remote")
    models.load(remote_name(base_url, model), "remote", "remote", api_key=api_key)
    store = Store(store_path)
    try:
        engine = models.wait_loaded(60)
        assert engine.is_remote and engine.family == "remote"
        chat = ChatService(store, models)
        cid, turn = chat.send("visitor", "What is the capital of France?", params={"max_new_tokens": 24,
                                                                                  "do_sample": False})
        deltas = list(turn.request.deltas())
        turn.saved.wait(30)
        saved = store.messages(cid, "visitor")[-1]
        # What the model says differs between CPUs' kernels (llama.cpp's greedy reply on one machine never named
        # Paris); what must hold is that the visitor's question reached the server as it is and the reply came back.
        # The prompt's token count is the server's own: as it counts the same question asked directly, or absent
        # (0) where the server reports no usage in a stream (llama-cpp-python), never a number made up here.
        client = openai.OpenAI(base_url=base_url, api_key=api_key)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        counted = client.chat.completions.create(model=model, messages=question, max_tokens=1, temperature=0)
        streamed = list(client.chat.completions.create(model=model, messages=question, max_tokens=1, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
        usage_in_streams = any(getattr(c, "usage", None) for c in streamed)
        assert len(deltas) >= 3 and "".join(deltas).strip()
        assert saved["content"] == "".join(deltas) and saved["finish_reason"] in ("stop", "length")
        assert saved["prompt_tokens"] == (counted.usage.prompt_tokens if usage_in_streams else 0)
        assert 0 < saved["new_tokens"] <= 24 and (saved["finish_reason"] == "stop" or saved["new_tokens"] == 24)
        assert saved["ttft_s"] > 0 and saved["decode_tok_s"] > 0
        _, turn = chat.send("visitor", "Write a very long story about a dragon.", cid)
        for i, _delta in enumerate(turn.request.deltas()):
            if i == 3:
                chat.stop("visitor", cid)
        turn.saved.wait(30)
        assert store.messages(cid, "visitor")[-1]["finish_reason"] == "stopped"
    finally:
        models.close()
        store.close()
    with pytest.raises(glm_core.ModelLoadError, match="API key"):
        glm_core.load(remote_name(base_url, model), api_key="wrong")


def test_glm_studio_runs_another_glm_studios_model(second_glm_studio, tmp_path):
    import glm_core
    from glm_core.engines import remote_name
    with pytest.raises(glm_core.ModelLoadError, match="no model 'gpt-4'"):
        glm_core.load(remote_name(second_glm_studio, "gpt-4"), api_key="remote-key")
    chat_through_remote(second_glm_studio, MODEL, "remote-key", tmp_path / "history.db")
