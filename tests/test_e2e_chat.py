"""End to end: the real server, headless Chromium, a streamed reply from the embedded model."""
import time

from playwright.sync_api import expect

from e2e import ARTIFACTS, browser, streamlit_server


def test_browser_sees_a_streamed_reply():
    with streamlit_server() as url, browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.get_by_text("GLM Studio").first).to_be_visible(timeout=60_000)
        for name in ["Chat", "Parameters", "Models", "Benchmark"]:
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        page.get_by_role("link", name="Chat", exact=True).click()
        box = page.get_by_test_id("stChatInputTextArea")
        box.fill("What is the capital of France?")
        box.press("Enter")
        assistant = page.get_by_test_id("stChatMessage").nth(1)
        expect(assistant).to_be_visible(timeout=120_000)
        seen = set()   # the reply's text as it grows: several lengths before the stats line = streamed
        deadline = time.time() + 240
        while "tokens/s" not in assistant.inner_text() and time.time() < deadline:
            seen.add(len(assistant.get_by_test_id("stMarkdownContainer").first.inner_text()))
            time.sleep(0.05)
        expect(assistant).to_contain_text("tokens/s")
        assert len(seen - {0}) >= 2, f"the reply did not stream: lengths seen {sorted(seen)}"
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
