"""End to end against the real server in headless Chromium: visitors, stop, conversations, models, password."""
import os
import time

import pytest
from playwright.sync_api import Page, expect

from app.access import FREE_GUESSES
from e2e import ARTIFACTS, OPERATOR_SECRET, browser, server_log, streamlit_server

LONG = 240_000


@pytest.fixture(scope="module")
def server():
    with streamlit_server() as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


def open_page(chromium, url: str, path: str = "", operator: bool = False) -> Page:
    """A new browser (its own cookies: a new visitor) on a page; `operator`: signed in with the operator link."""
    page = chromium.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{url}/{path}" + (f"?operator={OPERATOR_SECRET}" if operator else ""))
    expect(page.get_by_role("link", name="Chat", exact=True)).to_be_visible(timeout=60_000)
    return page


def reply_text(page: Page) -> str:
    return last_reply(page).get_by_test_id("stMarkdownContainer").first.inner_text()


def short_replies(page: Page, tokens: int = 40) -> None:
    """Set Max new tokens for this visitor's new chats on the Parameters page, then go back to Chat."""
    page.get_by_role("link", name="Parameters", exact=True).click()
    field = page.get_by_role("spinbutton", name="Max new tokens")
    field.fill(str(tokens))
    page.get_by_role("button", name="Apply").click()
    expect(page.get_by_text("Parameters saved.")).to_be_visible(timeout=30_000)
    page.get_by_role("link", name="Chat", exact=True).click()
    expect(page.get_by_test_id("stChatInputTextArea")).to_be_visible(timeout=30_000)


def send(page: Page, text: str) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def last_reply(page: Page):
    return page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarAssistant")).last


def wait_reply_done(page: Page) -> str:
    reply = last_reply(page)
    expect(reply.get_by_test_id("stCaptionContainer")).to_contain_text("tokens", timeout=LONG)
    return reply.get_by_test_id("stMarkdownContainer").first.inner_text()


def test_home_lists_the_pages_and_a_reply_streams_in(server, chromium):
    page = open_page(chromium, server)
    expect(page.get_by_role("heading", name="GLM Studio")).to_be_visible(timeout=60_000)
    for name in ["Chat", "Parameters", "Models", "Benchmark"]:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    page.get_by_role("link", name="Chat", exact=True).click()
    send(page, "What is the capital of France?")
    reply = last_reply(page)
    expect(reply).to_be_visible(timeout=120_000)
    seen = set()   # the reply's text as it grows: several lengths before the stats line = streamed
    deadline = time.time() + 240
    while "tokens/s" not in reply.inner_text() and time.time() < deadline:
        seen.add(len(reply.get_by_test_id("stMarkdownContainer").first.inner_text()))
        time.sleep(0.05)
    expect(reply.get_by_test_id("stCaptionContainer")).to_contain_text("tokens/s")
    assert len(seen - {0}) >= 2, f"the reply did not stream: lengths seen {sorted(seen)}"


def test_two_visitors_chat_at_the_same_time(server, chromium):
    a, b = open_page(chromium, server, "chat"), open_page(chromium, server, "chat")
    short_replies(a)
    short_replies(b)
    send(a, "Name three fruits.")
    send(b, "Name three planets.")
    reply_a, reply_b = wait_reply_done(a), wait_reply_done(b)
    assert reply_a.strip() and reply_b.strip()
    # Each browser sees its own conversation only.
    expect(a.get_by_test_id("stSidebar")).to_contain_text("Name three fruits.")
    expect(a.get_by_test_id("stSidebar")).not_to_contain_text("Name three planets.")
    expect(b.get_by_test_id("stSidebar")).to_contain_text("Name three planets.")
    expect(b.get_by_test_id("stSidebar")).not_to_contain_text("Name three fruits.")
    a.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    # A reload keeps the conversation list (the visitor cookie).
    a.reload()
    expect(a.get_by_test_id("stSidebar")).to_contain_text("Name three fruits.", timeout=60_000)


def test_a_reply_goes_on_while_its_visitor_opens_another_page(server, chromium):
    page = open_page(chromium, server, "chat")
    short_replies(page, 120)
    send(page, "Write a long story about a robot who learns to paint.")
    expect(last_reply(page)).to_contain_text("▌", timeout=LONG)
    seen = len(reply_text(page))
    page.get_by_role("link", name="Models", exact=True).click()
    expect(page.get_by_role("heading", name="Models", exact=True)).to_be_visible(timeout=30_000)
    time.sleep(4)
    page.get_by_role("link", name="Chat", exact=True).click()
    caption = last_reply(page).get_by_test_id("stCaptionContainer")
    expect(caption).to_contain_text("tokens", timeout=LONG)   # finished while the visitor was away, or since
    assert "stopped" not in caption.inner_text() and "failed" not in caption.inner_text()
    text = reply_text(page)
    assert len(text) > seen
    from storage import EVERYONE, Store
    store = Store(os.environ["GLM_STUDIO_DB"])   # the server's database: the reply is saved, whole and finished
    try:
        conversation = next(c for c in store.list_conversations(EVERYONE) if c["title"].startswith("Write a long story about a robot"))
        saved = store.messages(conversation["id"], EVERYONE)[-1]
    finally:
        store.close()
    assert saved["finish_reason"] in ("stop", "length") and saved["new_tokens"] > 10
    assert " ".join(saved["content"].split())[:40] == " ".join(text.split())[:40]


def test_two_visitors_replies_grow_at_the_same_time(server, chromium):
    a, b = open_page(chromium, server, "chat"), open_page(chromium, server, "chat")
    short_replies(a, 100)
    short_replies(b, 100)
    send(a, "Write a poem about the sea, in many verses.")
    send(b, "Write a poem about the mountains, in many verses.")
    expect(last_reply(a)).to_contain_text("▌", timeout=LONG)
    samples, deadline = [], time.time() + 240
    while time.time() < deadline:
        samples.append((len(reply_text(a)), len(reply_text(b))))
        if all("tokens" in last_reply(p).get_by_test_id("stCaptionContainer").all_inner_texts().__str__() for p in (a, b)):
            break
        time.sleep(0.3)
    both = sum(1 for (a0, b0), (a1, b1) in zip(samples, samples[1:]) if a1 > a0 and b1 > b0)
    assert both >= 3, f"the replies did not grow together: {samples}"


def test_stop_keeps_the_partial_reply(server, chromium):
    page = open_page(chromium, server, "chat")
    send(page, "Write a very long story about a dragon who learns to cook, with many chapters.")
    reply = last_reply(page)
    expect(reply).to_contain_text("▌", timeout=LONG)   # text is streaming in
    time.sleep(3)
    page.get_by_role("button", name="Stop").click()
    expect(last_reply(page).get_by_test_id("stCaptionContainer")).to_contain_text("stopped", timeout=60_000)
    assert len(last_reply(page).get_by_test_id("stMarkdownContainer").first.inner_text()) > 5


def test_new_rename_and_delete_a_conversation(server, chromium):
    page = open_page(chromium, server, "chat")
    short_replies(page)
    send(page, "Say hello.")
    wait_reply_done(page)
    page.get_by_test_id("stPopover").first.click()
    title = page.get_by_label("Title")
    title.fill("Greetings")
    title.press("Enter")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_test_id("stSidebar")).to_contain_text("Greetings", timeout=30_000)
    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_role("heading", name="Chat")).to_be_visible(timeout=30_000)
    page.get_by_test_id("stSidebar").get_by_role("button", name="Greetings").click()
    expect(page.get_by_role("heading", name="Greetings")).to_be_visible(timeout=30_000)
    page.get_by_test_id("stPopover").first.click()
    page.get_by_role("button", name="Delete conversation").click()
    expect(page.get_by_test_id("stSidebar")).not_to_contain_text("Greetings", timeout=30_000)


def test_switch_the_embedded_model_to_int8(server, chromium):
    page = open_page(chromium, server, "models", operator=True)
    page.get_by_test_id("stRadio").filter(has_text="Precision").get_by_text("int8", exact=True).click()
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.get_by_test_id("stAlert").filter(has_text="int8")).to_contain_text("Loaded", timeout=LONG)
    page.screenshot(path=str(ARTIFACTS / "models.png"), full_page=True)
    page.goto(server)
    expect(page.get_by_text("int8 · cpu").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "home.png"), full_page=True)
    chat = open_page(chromium, server, "chat")
    short_replies(chat)
    send(chat, "What is the capital of Italy?")
    assert wait_reply_done(chat).strip()


def test_closing_the_tab_during_a_load_loses_nothing(server, chromium):
    page = open_page(chromium, server, "models", operator=True)
    page.get_by_test_id("stRadio").filter(has_text="Precision").get_by_text("int4", exact=True).click()
    page.get_by_role("button", name="Load", exact=True).click()
    # The bar shows for about the load's second or two: checked at every frame, not at expect's growing intervals
    page.wait_for_function("() => document.body.innerText.includes('Loading smollm2-135m-instruct (int4')",
                           polling="raf", timeout=30_000)
    page.context.close()   # the operator leaves during the load: it goes on in the model service
    other = open_page(chromium, server, "models", operator=True)
    expect(other.get_by_test_id("stAlert").filter(has_text="int4")).to_contain_text("Loaded", timeout=LONG)
    chat = open_page(chromium, server, "chat")
    short_replies(chat)
    send(chat, "What is the capital of Spain?")
    assert wait_reply_done(chat).strip()


def test_a_page_opened_during_a_load_offers_load_again_once_it_ends(chromium):
    with streamlit_server() as url:   # the first visit starts the start-up model's load: this page sees it running
        page = open_page(chromium, url, "models", operator=True)
        # the bar and a disabled Load in one frame (checked at every frame: the load may take only a second or two)
        page.wait_for_function("""() => document.body.innerText.includes('Loading smollm2-135m-instruct')
            && [...document.querySelectorAll('button')].some(b => b.innerText.trim().endsWith('Load') && b.disabled)""",
                               polling="raf", timeout=30_000)
        expect(page.get_by_test_id("stAlert").filter(has_text="fp32")).to_contain_text("Loaded", timeout=LONG)
        expect(page.get_by_role("button", name="Load", exact=True)).to_be_enabled(timeout=30_000)


def test_screenshots_of_the_other_pages(server, chromium):
    page = open_page(chromium, server, "parameters")
    expect(page.get_by_role("heading", name="Parameters")).to_be_visible(timeout=60_000)
    for preset in ("Precise", "Balanced", "Creative", "Apply"):
        expect(page.get_by_role("button", name=preset)).to_be_visible()
    expect(page.get_by_role("spinbutton", name="Max new tokens")).to_be_visible()
    expect(page.get_by_test_id("stException")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "parameters.png"), full_page=True)


def test_password_gate_in_the_browser(chromium):
    with streamlit_server(env={"GLM_STUDIO_PASSWORD": "open sesame"}) as url:
        page = chromium.new_context().new_page()
        page.goto(url)
        field = page.get_by_label("Access password")
        expect(field).to_be_visible(timeout=60_000)
        expect(page.get_by_role("link", name="Chat", exact=True)).to_have_count(0)
        def wrong_guesses_logged() -> int:
            return server_log(url).count(" password from ")

        for guess in range(FREE_GUESSES):
            field.fill(f"nope {guess}")
            page.get_by_role("button", name="Enter").click()
            deadline = time.time() + 30
            while wrong_guesses_logged() <= guess:   # each guess checked (and logged) before the next
                assert time.time() < deadline
                time.sleep(0.1)
            expect(page.get_by_text("Wrong password.")).to_be_visible(timeout=30_000)
        field.fill("open sesame")   # right, but tried inside the wait the wrong ones earned: refused unchecked
        page.get_by_role("button", name="Enter").click()
        expect(page.get_by_text("Too many wrong passwords from this address")).to_be_visible(timeout=30_000)
        expect(page.get_by_role("link", name="Chat", exact=True)).to_have_count(0)
        assert wrong_guesses_logged() == FREE_GUESSES   # the refused try was not even checked
        time.sleep(1.5)
        field.fill("open sesame")
        page.get_by_role("button", name="Enter").click()
        expect(page.get_by_role("link", name="Chat", exact=True)).to_be_visible(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "password.png"))


def test_benchmark_run_ends_with_charts(server, chromium):
    from conftest import FIXTURES
    page = open_page(chromium, server, "benchmark", operator=True)
    page.get_by_test_id("stSelectbox").filter(has_text="Model").click()
    page.get_by_role("option", name="Local directory or .gguf file ...").click()
    page.get_by_label("Path (for the last choice)").fill(str(FIXTURES / "v2"))
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible(timeout=LONG)
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(3, timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "benchmark.png"), full_page=True)
    page.get_by_test_id("stVegaLiteChart").first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "benchmark-charts.png"))
