"""A hostile client speaking Streamlit's websocket protocol directly (no browser): clearing Streamlit's caches while
a reply streams, and guessing passwords as fast as the socket goes."""
import re
import time

import psutil
import pytest
from playwright.sync_api import expect

from e2e import SERVER_PIDS, browser, server_log, streamlit_server
from st_protocol import StreamlitClient, text_value, trigger
from test_e2e_app import LONG, last_reply, open_page, send, short_replies

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


def rss_gb(url: str) -> float:
    return psutil.Process(SERVER_PIDS[url]).memory_info().rss / 1e9


def test_clearing_streamlits_cache_mid_reply_loads_no_second_model(chromium):
    with streamlit_server() as url:
        page = open_page(chromium, url, "chat")
        short_replies(page, 160)
        send(page, "Write a long story about a lighthouse keeper and a storm.")
        reply = last_reply(page)
        expect(reply).to_contain_text("▌", timeout=LONG)   # streaming
        before = rss_gb(url)
        hostile = StreamlitClient(url)
        hostile.clear_cache()
        hostile.run()            # a script run after the clear: every page's objects are asked for again
        hostile.clear_cache()
        other = open_page(chromium, url, "chat")   # a new visitor whose pages run after the clear
        short_replies(other, 8)
        send(other, "Say hi.")
        expect(last_reply(other).get_by_test_id("stCaptionContainer")).to_contain_text("tokens", timeout=LONG)
        caption = last_reply(page).get_by_test_id("stCaptionContainer")
        expect(caption).to_contain_text("tokens", timeout=LONG)
        assert "failed" not in caption.inner_text() and "stopped" not in caption.inner_text()
        grown = rss_gb(url) - before
        assert grown < 0.3, f"the server grew by {grown:.2f} GB: a second copy of the model (about 0.6 GB)?"
        assert server_log(url).count("loaded smollm2-135m-instruct") == 1   # the model was loaded once
        hostile.close()


def wait_shown(run) -> int:
    """The seconds a refused password was told to wait (0 if it was not refused)."""
    found = re.search(r"try again in (\d+) s", " ".join(run.texts("alert")))
    return int(found.group(1)) if found else 0


def test_password_guesses_over_one_websocket_are_slowed_down_and_logged():
    with streamlit_server(env={"GLM_STUDIO_PASSWORD": PASSWORD}) as url:
        client = StreamlitClient(url)
        form = client.run()
        field, enter = form.widget("text_input", "Access password"), form.widget("button", "Enter")
        answers, start = [], time.time()
        for i in range(20):
            run = client.run([text_value(field.id, f"guess {i}"), trigger(enter.id)])
            answers.append(" ".join(run.texts("alert")))
        burst = time.time() - start
        checked = sum("Wrong password" in a for a in answers)
        refused = sum("Too many wrong passwords" in a for a in answers)
        assert checked + refused == 20
        # 20 tries in a burst of a few seconds: 3 free, then one per 1 s, 2 s, 4 s ... after the last wrong one
        assert checked <= 3 + max(1, int(burst).bit_length()), (checked, burst)
        # the right password during a wait is refused unchecked. On a slow CPU the burst's last wait may be about to
        # end: then let it end, and a wrong guess (checked) starts a fresh wait of 4 s or more
        if wait_shown(run) < 3:
            time.sleep(wait_shown(run) + 1)
            run = client.run([text_value(field.id, "one more wrong guess"), trigger(enter.id)])
            assert wait_shown(run) >= 3, run.texts("alert")
        run = client.run([text_value(field.id, PASSWORD), trigger(enter.id)])
        assert any("Too many wrong passwords" in t for t in run.texts("alert"))
        assert "wrong operator or guest password from" in server_log(url)
        client.close()
