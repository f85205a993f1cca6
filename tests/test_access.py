"""Operator and guests through AppTest and the access rules: what a guest cannot see or do, the limits, the
exposure the operator is told about, and what an error shows."""
import re
import shutil
import tomllib
from types import SimpleNamespace

import pytest
from streamlit.testing.v1 import AppTest

from app import runtime
from app.access import FREE_GUESSES, Access, Guesses, loadable
from app.bench_jobs import BenchBusy, BenchJobs
from app.chat import MAX_INPUT_CHARS, ChatError
from conftest import FIXTURES, ROOT
from glm_core import bench
from test_app_pages import GREEDY, app, send, shown


def test_a_guest_sees_only_their_own_conversations_and_no_operator_view(store):
    alice = app("app_pages/chat.py", visitor="alice-1", new_chat_params=GREEDY)
    send(alice, "My medical question")
    cid = alice.session_state["conversation"]
    mallory = app("app_pages/chat.py", visitor="mallory-1", conversation=cid)   # knows the id, somehow
    assert mallory.session_state["conversation"] is None
    assert not any("medical" in shown(m) for m in mallory.markdown)
    assert not mallory.toggle   # no "everyone's conversations" for a guest
    operator = app("app_pages/chat.py", visitor="olga-1", role="operator", view_everyone=True, conversation=cid)
    assert any("Read-only" in shown(i) for i in operator.info)
    assert not any(b.label in ("Rename", "Delete conversation", "Clear messages", "Regenerate") for b in operator.button)
    assert operator.chat_input[0].disabled


def test_model_output_and_typed_text_are_not_markup_for_the_operator(store):
    alice = app("app_pages/chat.py", visitor="alice-2", new_chat_params=GREEDY)
    send(alice, "![x](http://203.0.113.9/track.gif) [sign in](http://203.0.113.9/phish)")
    cid = alice.session_state["conversation"]
    operator = app("app_pages/chat.py", visitor="olga-2", role="operator", view_everyone=True, conversation=cid)
    rendered = " ".join(m.value for m in operator.markdown)
    assert "](http://203.0.113.9/track.gif)" not in rendered and "!\\[" not in rendered.replace("\\!", "")
    assert "🖼 x (http://203.0.113.9/track.gif)" in " ".join(shown(m) for m in operator.markdown)


def test_limits_on_input_upload_and_import(monkeypatch):
    at = app("app_pages/chat.py", visitor="limits")
    assert at.chat_input[0].max_chars == MAX_INPUT_CHARS
    chat = runtime.chat()
    with pytest.raises(ChatError, match="limit"):
        chat.send("limits", "x" * (MAX_INPUT_CHARS + 1))
    monkeypatch.setenv("GLM_STUDIO_MAX_INPUT_CHARS", "10")
    with pytest.raises(ChatError, match="limit is 10"):
        chat.send("limits", "eleven chars")
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] <= 20          # MB, Streamlit's default is 200
    assert config["client"]["showErrorDetails"] == "none"    # no tracebacks to clients


def test_a_page_error_shows_an_id_and_logs_the_traceback(caplog):
    from app import server
    at = AppTest.from_string(
        "from app import server\n"
        "try:\n"
        "    raise ValueError('secret /srv/path')\n"
        "except ValueError as e:\n"
        "    server.on_script_error(e)\n")
    at.run()
    message = at.error[0].value
    assert "error " in message and "/srv/path" not in message
    error_id = message.split("error ")[1][:8]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_benchmarks_are_the_operators_one_at_a_time_with_room_on_disk(monkeypatch, tmp_path):
    guest = app("app_pages/benchmark.py")
    assert not any(b.label == "Run" for b in guest.button) and not any(s.key == "bench-model" for s in guest.selectbox)
    jobs = BenchJobs(runtime.store(), runtime.models())
    spec = bench.BenchSpec(model=str(FIXTURES / "v2"), precisions=["fp32"], prompt_tokens=[8], new_tokens=2,
                           quality=False)
    with pytest.raises(PermissionError):
        jobs.start(spec, operator=False)
    job = jobs.start(spec, operator=True)
    with pytest.raises(BenchBusy):
        jobs.start(spec, operator=True)
    with pytest.raises(PermissionError):
        jobs.cancel(operator=False)
    job.thread.join(300)
    monkeypatch.setenv("GLM_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**11, used=0, free=2 * 10**9))
    with pytest.raises(bench.BenchError, match="only 2.0 GB is free"):
        jobs.start(bench.BenchSpec(model="random:chatglm2-6b", precisions=["int4"], prompt_tokens=[32]), operator=True)


def test_the_operator_is_told_how_the_server_is_exposed(monkeypatch):
    monkeypatch.delenv("GLM_STUDIO_PASSWORD", raising=False)
    operator = app(role="operator")
    exposure_line = next(shown(c) for c in operator.caption if "password off" in shown(c))
    assert re.search(r"Bound to (every interface|0\.0\.0\.0) .* [1-9]\d* visitors in the last 5 minutes",
                     exposure_line), exposure_line
    assert any("GLM_STUDIO_PASSWORD" in shown(w) for w in operator.warning)
    guest = app()
    assert not guest.warning and not any("password off" in shown(c) for c in guest.caption)
    exposure = runtime.access().exposure("127.0.0.1", 8501)
    assert exposure.loopback and not exposure.warning
    monkeypatch.setenv("GLM_STUDIO_PASSWORD", "pw")
    assert not runtime.access().exposure("0.0.0.0", 8501).warning


def test_wrong_passwords_wait_longer_and_longer(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("app.access.time.monotonic", lambda: clock[0])
    guesses, roles = Guesses(), {"operator": "op", "guest": "pw"}
    for i in range(FREE_GUESSES):
        role, wait = guesses.check("10.0.0.5", "nope", roles)
        assert role is None and wait == (pytest.approx(1.0) if i == FREE_GUESSES - 1 else 0.0)
    assert guesses.check("10.0.0.5", "pw", roles)[0] is None          # refused unchecked while waiting
    assert guesses.check("10.0.0.6", "pw", roles) == ("guest", 0.0)   # another client is not slowed
    clock[0] += 1.01
    assert guesses.check("10.0.0.5", "nope", roles)[1] == pytest.approx(2.0)   # 1 s, then 2 s, ...
    clock[0] += 2.01
    assert guesses.check("10.0.0.5", "op", roles) == ("operator", 0.0)   # right: the count starts again
    assert guesses.wait_s("10.0.0.5") == 0.0


def test_visitor_cookies_are_signed_with_a_private_server_secret(tmp_path):
    access = Access(tmp_path)
    assert (tmp_path / "server-secret").stat().st_mode & 0o777 == 0o600
    visitor, cookie = access.visitor_cookie()
    assert access.visitor_from_cookie(cookie) == visitor
    assert access.visitor_from_cookie(visitor) is None                                   # unsigned
    assert access.visitor_from_cookie(cookie[:-1] + ("0" if cookie[-1] != "0" else "1")) is None   # forged
    assert Access(tmp_path).visitor_from_cookie(cookie) == visitor                       # the secret is kept
    assert Access(tmp_path / "elsewhere").visitor_from_cookie(cookie) is None
    (tmp_path / "server-secret").chmod(0o644)   # loosened by hand: tightened again, the secret kept
    assert Access(tmp_path).visitor_from_cookie(cookie) == visitor
    assert (tmp_path / "server-secret").stat().st_mode & 0o777 == 0o600


def test_model_paths_are_registry_hub_or_under_the_models_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_STUDIO_MODELS_DIR", str(tmp_path))
    (tmp_path / "mine").mkdir()
    assert loadable("chatglm2-6b") == "" and loadable("THUDM/chatglm3-6b") == ""
    assert loadable(str(tmp_path / "mine")) == "" and loadable(str(tmp_path / "missing")) == ""
    for outside in ("/etc/shadow", "/nonexistent/x", f"{tmp_path}/../etc", "~/.ssh/id_rsa", "../../etc/passwd"):
        assert "is none of these" in loadable(outside), outside
    assert loadable("/etc/shadow").replace("/etc/shadow", "X") == loadable("/nonexistent/x").replace(
        "/nonexistent/x", "X")   # the same answer whether the file exists or not
