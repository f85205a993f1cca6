"""Page logic of every page through streamlit's AppTest: the real app, store and embedded model."""
import json
import re
import time

import pytest
from streamlit.testing.v1 import AppTest

from app.access import FREE_GUESSES
from app.safe_markdown import plain_text
from conftest import ROOT
from glm_core import GenerationParams

GREEDY = GenerationParams(do_sample=False, max_new_tokens=16).to_dict()


def app(page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=300)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def shown(element) -> str:
    """An element's text as the visitor reads it (untrusted text is shown with its Markdown escaped)."""
    return re.sub(r"\\(.)", r"\1", element.value)


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def send(at: AppTest, text: str) -> None:
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception


def test_home_shows_model_memory_and_share_urls():
    at = app()
    text = " ".join(m.value for m in at.markdown)
    assert "**Model**" in text and "**Memory**" in text and "Local: `http://localhost:" in text
    assert at.get("page_link")


def test_chat_saves_the_conversation_and_lists_it(store):
    at = app("app_pages/chat.py", visitor="visitor-a", new_chat_params=GREEDY)
    send(at, "What is the capital of France?")
    conversations = store.list_conversations("visitor-a")
    assert len(conversations) == 1 and conversations[0]["title"] == "What is the capital of France?"
    messages = store.messages(conversations[0]["id"], "visitor-a")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] and messages[1]["finish_reason"] in ("stop", "length")
    assert messages[1]["new_tokens"] > 0 and messages[1]["ttft_s"] > 0
    assert any(b.label == plain_text("What is the capital of France?") for b in at.sidebar.button)
    assert any("Context" in p.proto.text and "tokens" in p.proto.text for p in at.get("progress"))

    # Another visitor does not see it.
    other = app("app_pages/chat.py", visitor="visitor-b")
    assert not any(b.label == plain_text("What is the capital of France?") for b in other.sidebar.button)


def test_regenerate_edit_rename_clear_and_delete(store):
    at = app("app_pages/chat.py", visitor="visitor-c", new_chat_params=GREEDY)
    send(at, "Name a colour.")
    cid = at.session_state["conversation"]
    first = store.messages(cid, "visitor-c")[1]["created_at"]
    button(at, "Regenerate").click().run()
    assert not at.exception
    messages = store.messages(cid, "visitor-c")
    assert len(messages) == 2 and messages[1]["created_at"] != first      # the old reply was replaced

    button(at, "Edit").click().run()
    at.text_area(key=f"edit-{messages[0]['id']}").set_value("Name a fruit.").run()
    button(at, "Resend").click().run()
    assert not at.exception
    messages = store.messages(cid, "visitor-c")
    assert [m["content"] for m in messages][:1] == ["Name a fruit."] and len(messages) == 2

    at.text_input(key=f"title-{cid}").set_value("Fruit talk").run()
    button(at, "Rename").click().run()
    assert store.get_conversation(cid, "visitor-c")["title"] == "Fruit talk"

    button(at, "Clear messages").click().run()
    assert store.messages(cid, "visitor-c") == []

    button(at, "Delete conversation").click().run()
    assert store.conversation_owner(cid) is None
    assert at.session_state["conversation"] is None


def test_system_prompt_is_saved_with_the_conversation(store):
    at = app("app_pages/chat.py", visitor="visitor-d", new_chat_params=GREEDY)
    send(at, "Hello")
    cid = at.session_state["conversation"]
    at.text_area(key=f"system-{cid}").set_value("Answer in one word.").run()
    assert store.get_conversation(cid, "visitor-d")["system_prompt"] == "Answer in one word."


def test_parameters_presets_and_form_save_to_the_conversation(store):
    at = app("app_pages/chat.py", visitor="visitor-e", new_chat_params=GREEDY)
    send(at, "Hi")
    cid = at.session_state["conversation"]
    at.switch_page("app_pages/parameters.py").run()
    assert not at.exception
    button(at, "Creative").click().run()
    saved = store.get_conversation(cid, "visitor-e")["params"]
    assert saved["do_sample"] is True and saved["temperature"] == 1.1
    at.slider(key="param-temperature").set_value(0.3)
    at.number_input(key="param-seed").set_value(42)
    button(at, "Apply").click().run()
    saved = store.get_conversation(cid, "visitor-e")["params"]
    assert saved["temperature"] == pytest.approx(0.3) and saved["seed"] == 42


def test_models_page_lists_the_registry_and_refuses_what_cannot_be():
    at = app("app_pages/models.py", role="operator")
    table = at.dataframe[0].value
    assert {"chatglm2-6b", "chatglm3-6b-32k", "smollm2-135m-instruct"} <= set(table["model"])
    at.selectbox[0].set_value("chatglm2-6b-int4").run()
    precision = next(r for r in at.radio if r.label == "Precision")
    assert precision.options == ["int4"]                   # a pre-quantized checkpoint loads only as stored
    assert any("stored as INT4" in c.value for c in at.caption)


def settled(at: AppTest) -> AppTest:
    """Wait until the model service loads nothing, and draw the page again."""
    from app import runtime
    deadline = time.time() + 300
    while runtime.models().loading and time.time() < deadline:
        time.sleep(0.2)
    return at.run()


def loaded_after(at: AppTest, label: str = "Load") -> AppTest:
    """Click Load once the model service is idle, wait for the load to end, and draw the page again."""
    button(settled(at), label).click().run()
    return settled(at)


def test_models_page_switches_to_a_local_checkpoint_and_back():
    at = app("app_pages/models.py", role="operator")
    at.selectbox[0].set_value("Local directory, .gguf file or Hub id ...").run()
    from conftest import FIXTURES
    at.text_input[0].set_value(str(FIXTURES / "v3")).run()
    next(r for r in at.radio if r.label == "Precision").set_value("fp32").run()
    loaded_after(at)
    assert not at.exception
    assert any("Loaded:" in shown(s) and "v3" in shown(s) for s in at.success), [e.value for e in at.error]
    home = app()
    assert any("v3" in m.value for m in home.markdown)
    at.selectbox[0].set_value("smollm2-135m-instruct").run()
    next(r for r in at.radio if r.label == "Precision").set_value("fp32").run()
    loaded_after(at)
    assert any("Loaded:" in shown(s) and "smollm2" in shown(s) for s in at.success)


def test_a_failed_load_is_a_clear_error_and_the_previous_model_comes_back():
    from conftest import FIXTURES
    at = app("app_pages/models.py", role="operator")
    at.selectbox[0].set_value("Local directory, .gguf file or Hub id ...").run()
    at.text_input[0].set_value(str(FIXTURES / "no-such-checkpoint")).run()
    loaded_after(at)
    assert not at.exception
    assert any("no-such-checkpoint" in shown(e) and "loaded again" in shown(e) for e in at.error), \
        [e.value for e in at.error]
    assert any("Loaded:" in shown(s) and "smollm2" in shown(s) for s in at.success)


def test_guests_see_the_model_but_cannot_load_and_paths_outside_the_models_dir_are_refused():
    guest = app("app_pages/models.py")
    assert not any(b.label == "Load" for b in guest.button) and not guest.main.text_input and not guest.main.radio
    at = app("app_pages/models.py", role="operator")
    at.selectbox[0].set_value("Local directory, .gguf file or Hub id ...").run()
    for path in ("/etc/shadow", "/nonexistent/chatglm2-6b"):
        at.text_input[0].set_value(path).run()
        assert any("is none of these" in shown(e) for e in at.error)
        assert not any("Needs about" in c.value for c in at.caption)   # says nothing of the file
        assert button(at, "Load").disabled


def test_password_gate(monkeypatch):
    monkeypatch.setenv("GLM_STUDIO_PASSWORD", "s3cret")
    at = app()
    assert at.text_input[0].label == "Access password"
    at.text_input[0].set_value("wrong")
    at.button[0].click().run()
    assert any("Wrong password" in e.value for e in at.error)
    assert not any("**Model**" in m.value for m in at.markdown)
    at.text_input[0].set_value("s3cret")
    at.button[0].click().run()
    assert any("**Model**" in m.value for m in at.markdown)


def test_the_last_free_wrong_password_is_called_wrong_and_the_next_try_refused(monkeypatch):
    """The guess that starts the wait was checked: it says so, with the wait; a try inside the wait is refused."""
    clock = [5000.0]
    monkeypatch.setattr("app.access.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("app_pages.ui.client_address", lambda: "10.9.8.7")   # AppTest's address is new each run
    monkeypatch.setenv("GLM_STUDIO_PASSWORD", "s3cret")
    at = app()
    for i in range(FREE_GUESSES):
        at.text_input[0].set_value(f"wrong {i}")
        at.button[0].click().run()
        errors = [e.value for e in at.error]
        assert errors and errors[-1].startswith("Wrong password."), errors
    assert "try again in 1 s" in errors[-1]
    at.text_input[0].set_value("s3cret")
    at.button[0].click().run()
    assert any("Too many wrong passwords" in e.value for e in at.error)
    assert not any("**Model**" in m.value for m in at.markdown)
    clock[0] += 1.01
    at.text_input[0].set_value("s3cret")
    at.button[0].click().run()   # right, after the wait: the count starts again
    assert any("**Model**" in m.value for m in at.markdown)


def test_export_json_round_trips_through_import(store):
    at = app("app_pages/chat.py", visitor="visitor-f", new_chat_params=GREEDY)
    send(at, "Count to three.")
    exported = store.export_conversations("visitor-f")
    assert len(exported["conversations"]) == 1 and len(exported["conversations"][0]["messages"]) == 2
    labels = [b.label for b in at.get("download_button")] if at.get("download_button") else []
    assert {"Export Markdown", "Export JSON"} <= set(labels)
    # import the JSON text into another visitor's history: the same conversation comes back, message for message
    ids = store.import_conversations(json.dumps(exported), "visitor-f2")
    again = store.export_conversations("visitor-f2")
    assert [c["id"] for c in again["conversations"]] == ids
    assert ids[0] != exported["conversations"][0]["id"]   # same database: the copy gets a fresh id

    def without_id(conversation: dict) -> dict:
        return {k: v for k, v in conversation.items() if k != "id"}
    assert [without_id(c) for c in again["conversations"]] == [without_id(c) for c in exported["conversations"]]
