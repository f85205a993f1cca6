"""Page logic of Chat through streamlit's AppTest (the real app, the real embedded model)."""
from streamlit.testing.v1 import AppTest

from conftest import ROOT


def test_chat_page_streams_a_reply_from_the_embedded_model():
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=300)
    at.run()
    at.switch_page("app_pages/chat.py").run()
    assert not at.exception
    at.chat_input[0].set_value("What is the capital of France?").run()
    assert not at.exception, at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    reply = at.chat_message[1].markdown[0].value
    assert "Paris" in reply
    assert "tokens/s" in at.chat_message[1].caption[0].value
