"""A LAN server people can trust, in a real browser: typed text never becomes another visitor's markup (no image is
fetched, links show where they go), and the visitor cookie is signed and out of page scripts' reach."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import expect

from e2e import browser, free_port, streamlit_server
from test_e2e_app import LONG, last_reply, open_page, send, short_replies


@pytest.fixture(scope="module")
def server():
    with streamlit_server() as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


@pytest.fixture
def tracker():
    """An HTTP server that records every request: an image that a page fetched lands here."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(b"GIF89a")

        def log_message(self, *args):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", hits
    httpd.shutdown()


def test_typed_markdown_shows_as_text_on_the_operators_page(server, chromium, tracker):
    base, hits = tracker
    typed = (f"Look ![pixel]({base}/typed.gif) and <img src='{base}/raw.gif'> and "
             f"[Session expired - sign in again]({base}/phish)")
    guest = open_page(chromium, server, "chat")
    short_replies(guest, 4)
    send(guest, typed)
    expect(last_reply(guest).get_by_test_id("stCaptionContainer")).to_contain_text("tokens", timeout=LONG)
    operator = open_page(chromium, server, "chat", operator=True)
    operator.get_by_text("Everyone's conversations").click()
    operator.get_by_test_id("stSidebar").get_by_role("button", name="Look").first.click()
    message = operator.get_by_test_id("stChatMessage").first
    expect(message).to_contain_text(f"{base}/typed.gif", timeout=30_000)   # the address, as text
    expect(message.locator("img")).to_have_count(0)
    link = message.get_by_role("link").filter(has_text="phish")
    expect(link).to_have_text(f"{base}/phish")   # a link shows where it goes
    for page in (guest, operator):
        page.reload()
        expect(page.get_by_role("link", name="Chat", exact=True)).to_be_visible(timeout=60_000)
    time.sleep(2)
    assert hits == [], f"the browser fetched {hits}"


def test_a_typed_path_in_an_error_is_text(server, chromium, tracker):
    base, hits = tracker
    page = open_page(chromium, server, "models", operator=True)
    expect(page.get_by_role("heading", name="Load a model")).to_be_visible(timeout=60_000)
    page.get_by_role("heading", name="Or use another server's model").scroll_into_view_if_needed()   # room below
    page.get_by_test_id("stSelectbox").filter(has_text="Model").click()
    page.get_by_role("option", name="Local directory, .gguf file or Hub id ...").click()
    path = f"/tmp/![x]({base}/err.gif)"
    page.get_by_label("Path or Hub id").fill(path)
    page.get_by_label("Path or Hub id").press("Enter")
    alert = page.get_by_test_id("stAlert").filter(has_text="is none of these")
    expect(alert).to_contain_text(path, timeout=30_000)
    expect(alert.locator("img")).to_have_count(0)
    time.sleep(2)
    assert hits == []


def test_the_visitor_cookie_is_signed_and_hidden_from_page_scripts(server, chromium):
    first = chromium.new_context()
    page = first.new_page()
    page.goto(f"{server}/chat")
    expect(page.get_by_role("link", name="Chat", exact=True)).to_be_visible(timeout=60_000)
    short_replies(page, 4)
    send(page, "My medical question")
    expect(last_reply(page).get_by_test_id("stCaptionContainer")).to_contain_text("tokens", timeout=LONG)
    cookie = next(c for c in first.cookies() if c["name"] == "glm_studio_visitor")
    assert cookie["httpOnly"] and "glm_studio_visitor" not in page.evaluate("document.cookie")
    visitor, signature = cookie["value"].split(".")
    for forged in (visitor, f"{visitor}.{'0' * len(signature)}", f"{'a' * 32}.{signature}"):
        other = chromium.new_context()
        other.add_cookies([{**cookie, "value": forged}])
        intruder = other.new_page()
        intruder.goto(f"{server}/chat")
        expect(intruder.get_by_role("link", name="Chat", exact=True)).to_be_visible(timeout=60_000)
        expect(intruder.get_by_test_id("stSidebar")).to_contain_text("Conversations")
        expect(intruder.get_by_test_id("stSidebar")).not_to_contain_text("My medical question")
        replaced = next(c for c in other.cookies() if c["name"] == "glm_studio_visitor")
        assert replaced["value"] != forged    # a new visitor's signed cookie
        other.close()
    same = chromium.new_context()
    same.add_cookies([cookie])   # the browser's own cookie, as it is: the same visitor
    again = same.new_page()
    again.goto(f"{server}/chat")
    expect(again.get_by_test_id("stSidebar")).to_contain_text("My medical question", timeout=60_000)
