"""Untrusted text on Streamlit pages: model output keeps its formatting but fetches nothing and hides no link
target; any other string is shown literally.

The output is checked by parsing it again, as the page would, with markdown-it-py (CommonMark + GFM tables and
strikethrough, raw HTML recognised so that any HTML left in the output shows up): the checks look at what the
Markdown becomes (images, links, HTML), not at how the string is spelled."""
import itertools
import re
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt

from app.safe_markdown import code_text, model_markdown, plain_text

IMPORT = "from app.safe_markdown import model_markdown, plain_text"   # used by the AppTest scripts

PAGE = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
PAGE.validateLink = lambda url: True          # the page's parser makes a link of any destination, javascript: too
SAFE_HREF = re.compile(r"(?i)(https?|mailto):")


def tokens(markdown: str):
    """Every token of the parsed Markdown, inline ones included."""
    out = []
    for t in PAGE.parse(markdown):
        out.append(t)
        for child in t.children or []:
            out += [child, *(child.children or [])]        # an image's alt text is its children
    return out


def visible(markdown: str) -> str:
    """The text a reader sees (text, code, link texts), spaces collapsed."""
    parts = [" " if t.type.endswith("break") else t.content for t in tokens(markdown)
             if t.type in ("text", "code_inline", "softbreak", "hardbreak")]
    return " ".join("".join(parts).split())


def code_contents(markdown: str) -> list[str]:
    return [t.content for t in tokens(markdown) if t.type in ("fence", "code_block", "code_inline")]


def assert_inert(markdown: str) -> None:
    """No image, no raw HTML, no link but one whose visible text is its address (http, https or mailto),
    no image syntax or Streamlit directive outside code."""
    toks = tokens(markdown)
    assert not [t for t in toks if t.type == "image"], markdown
    assert not [t for t in toks if t.type in ("html_inline", "html_block")], markdown
    for i, t in enumerate(toks):
        if t.type == "link_open":
            href = t.attrGet("href")
            assert SAFE_HREF.match(href), markdown
            assert unquote(toks[i + 1].content) in (unquote(href), unquote(href.removeprefix("mailto:"))), markdown
    code = code_contents(markdown)
    assert markdown.count("![") == sum(c.count("![") for c in code), markdown
    directive = re.compile(r"(?<!\\)(?:\\\\)*:[A-Za-z][\w-]*[\[{]")      # a colon no backslash escapes
    assert len(directive.findall(markdown)) == sum(len(directive.findall(c)) for c in code), markdown
    assert not [t for t in toks if t.type == "text" and ":streamlit:" in t.content], markdown   # the logo


# ---------------------------------------------------------------- images

def test_image_becomes_its_alt_and_address():
    out = model_markdown("Look: ![cat](http://host.example/?q=secret) ok")
    assert_inert(out)
    assert "🖼 cat (http://host.example/?q=secret)" in visible(out)


def test_reference_image_becomes_its_alt_and_address():
    out = model_markdown("See ![chart][c] and ![c]\n\n[c]: https://host.example/c.png \"t\"")
    assert_inert(out)
    assert visible(out).count("(https://host.example/c.png)") == 2


@pytest.mark.parametrize("html, shown", [
    ('<img src="http://host.example/a.png" alt="a cat">', "🖼 a cat (http://host.example/a.png)"),
    ("<IMG SRC=http://host.example/b.png>", "🖼 (http://host.example/b.png)"),
    ("before <script>fetch('http://host.example')</script> after", "<script>fetch('http://host.example')</script>"),
    ('<iframe src="http://host.example/"></iframe>', '<iframe src="http://host.example/"></iframe>'),
    ('<div>\n<img src="http://host.example/c.png">\n</div>', "🖼 (http://host.example/c.png)"),
    ('text <a href="http://host.example/">Session expired - sign in again</a>', 'href="http://host.example/"'),
])
def test_raw_html_is_shown_as_text(html, shown):
    out = model_markdown(html)
    assert_inert(out)
    assert shown in visible(out)


# ---------------------------------------------------------------- links

def test_link_shows_its_destination():
    out = model_markdown("[Session expired - sign in again](http://evil.example/login)")
    assert_inert(out)
    assert "Session expired - sign in again (http://evil.example/login)" in visible(out)
    links = [t for t in tokens(out) if t.type == "link_open"]
    assert [t.attrGet("href") for t in links] == ["http://evil.example/login"]   # still clickable, address shown


def test_reference_link_shows_its_destination():
    out = model_markdown("[docs][d] and [d]\n\n[d]: https://evil.example/d")
    assert_inert(out)
    assert visible(out).count("(https://evil.example/d)") == 2


@pytest.mark.parametrize("link", [
    "[click](javascript:alert(1))", "[click](JaVaScRiPt:alert(1))", "[click](data:text/html,<b>x</b>)",
    "[click](vbscript:x)", "[click](ftp://host.example/x)", "[click](/relative/page)", "[click](#anchor)",
    "<ftp://host.example/x>", "[click](tel:123)",
])
def test_only_http_https_and_mailto_stay_links(link):
    out = model_markdown(link)
    assert_inert(out)
    assert not [t for t in tokens(out) if t.type == "link_open"]


def test_autolinks_and_mail_stay_links_showing_their_address():
    out = model_markdown("<https://ok.example/a> and <me@ok.example> and [me@ok.example](mailto:me@ok.example)")
    assert_inert(out)
    hrefs = [t.attrGet("href") for t in tokens(out) if t.type == "link_open"]
    assert hrefs == ["https://ok.example/a", "mailto:me@ok.example", "mailto:me@ok.example"]


def test_image_inside_a_link():
    out = model_markdown("[![badge](http://img.example/b.svg)](http://site.example/)")
    assert_inert(out)
    assert "🖼 badge (http://img.example/b.svg) (http://site.example/)" in visible(out)


# ---------------------------------------------------------------- Streamlit's own syntax

@pytest.mark.parametrize("text", [
    ":red[alert]", ":help[![x](http://host.example/)]", ':color[x]{foreground="red"}', ":small[x]",
    ":streamlit:", "a :blue-badge[b] c", ":material/home: :smile:",
])
def test_streamlit_directives_are_text(text):
    for out in (model_markdown(text), plain_text(text)):
        assert_inert(out)


# ---------------------------------------------------------------- code and LaTeX, as before

CODE = [
    "```python\nx = '![a](http://e.example/)'  \n<img src=x>\n```",
    "~~~\n:red[x] \\(a\\) $5\n~~~",
    "    indented ![a](http://e.example/) $x$",
    "Inline `![b](http://e.example/)` and ``a ` b`` and `` `x` `` and `<img src=y>`",
    "> - quoted list\n>\n>   ```\n>   ![c](http://e.example/)\n>   ```",
]


@pytest.mark.parametrize("src", CODE)
def test_code_is_untouched(src):
    out = model_markdown(src)
    assert code_contents(out) == code_contents(src)
    assert not [t for t in tokens(out) if t.type in ("image", "html_inline", "html_block")]


def test_code_in_a_table_cell_keeps_its_pipe():
    out = model_markdown("| a | b |\n|---|---|\n| `x\\|y` | ![i](http://e.example/) |")
    assert_inert(out)
    assert "x|y" in code_contents(out)


def test_latex_becomes_dollars_and_a_dollar_stays_a_dollar():
    out = model_markdown("Euler: \\(e^{i\\pi}+1=0\\) costs $5, \\( x \\) too.\n\n"
                         "\\[\n\\begin{aligned}\na &= b \\\\\n- c &= d\n\\end{aligned}\n\\]\n\n"
                         "where \\[ y^2 \\] is inline")
    assert "$e^{i\\pi}+1=0$" in out and "$x$" in out
    assert "\\$5" in out
    lines = re.sub(r"\n +", "\n", out)                                    # indentation is LaTeX's whitespace
    assert "$$\n\\begin{aligned}\na &= b \\\\\n- c &= d\n\\end{aligned}\n$$" in lines
    assert "$$y^2$$" in lines or "$$\ny^2\n$$" in lines
    assert model_markdown("`\\(a\\)` $").startswith("`\\(a\\)`")                 # code keeps its LaTeX


def test_latex_that_would_be_markdown_again_is_shown_as_text():
    # Math the page did not typeset would be parsed as Markdown: it must not carry an image or a directive.
    for src in ["\\( a ![x](http://e.example/) b \\)", "\\[ :help[![x](http://e.example/)] \\]",
                "\\(a$ ![x](http://e.example/) $b\\)"]:
        out = model_markdown(src)
        assert_inert(out)
        assert "$" not in out.replace("\\$", "")


@pytest.mark.parametrize("src", [
    "\\[\n~~~\n\\]\n\n```\n~~~\n![x](http://e.example/)\n```",
    "- \\[\n  <!--\n  \\]\n  ```\n  -->\n  ![x](http://e.example/)\n  ```",
])
def test_a_formula_line_cannot_open_a_block_that_ends_inside_code(src):
    # Untypeset, a line of the formula that opened a fence (or an HTML comment) would end inside the code
    # block after it, and the rest of that code would be Markdown.
    assert_inert(model_markdown(src))


# ---------------------------------------------------------------- formatting is kept

def test_formatting_is_kept():
    src = ("# Title\n\nSome **bold**, *it*, ~~gone~~.\n\n- one\n- two\n  1. a\n  2. b\n\n> quoted **x**\n\n"
           "| h1 | h2 |\n|:--|--:|\n| c | d |\n\n***\n\nline\\\nbreak")
    kinds = {t.type for t in tokens(model_markdown(src))}
    assert {"heading_open", "strong_open", "em_open", "s_open", "bullet_list_open", "ordered_list_open",
            "blockquote_open", "table_open", "hr", "hardbreak"} <= kinds
    assert visible(model_markdown(src)) == visible(src)


# ---------------------------------------------------------------- every combination stays inert

SNIPPETS = ["![x](http://e.example/?q=1)", "![x][r]", "<img src=http://e.example/i.png>", "[t](http://e.example/)",
            "[t](javascript:alert(1))", ":help[![x](http://e.example/)]", "\\(a ![x](http://e.example/)\\)",
            "`![c](http://e.example/)`", "<script>x</script>", ":streamlit:"]
WRAPPERS = ["{}", "# {}", "> {}", "- {}", "1. {}", "**{}**", "[w {}](http://w.example/)", "| a |\n|---|\n| {} |",
            "- > 1. {}", "text\n{}\n=="]


@pytest.mark.parametrize("snippet, wrapper", list(itertools.product(SNIPPETS, WRAPPERS)))
def test_every_combination_is_inert(snippet, wrapper):
    assert_inert(model_markdown(wrapper.format(snippet) + "\n\n[r]: http://e.example/r.png"))


# ---------------------------------------------------------------- plain_text

EVIL = ["Can't load C:\\models\\![x](http://e.example/?q=1)",
        "<img src=http://e.example/i.png> [sign in](http://e.example/)",
        "# not a title\n    not code\n- not a list\n1. nor this\n> nor a quote", "| a |\n|---|\n| b |",
        ":red[x] :streamlit: $x$ \\(y\\) `z` ~~s~~ *e* _u_ &amp; &#60;", "line one\nline two\r\nline three"]


@pytest.mark.parametrize("text", EVIL)
def test_plain_text_is_shown_literally(text):
    out = plain_text(text)
    assert_inert(out)
    assert {t.type for t in tokens(out)} <= {"paragraph_open", "paragraph_close", "inline", "text", "hardbreak"}
    lines = [ln.lstrip(" \t") for ln in text.replace("\r\n", "\n").split("\n")]
    assert visible(out).replace("\u2060", "").replace("\xa0", "") == " ".join(" ".join(lines).split())


def test_plain_text_keeps_line_breaks():
    assert [t.type for t in tokens(plain_text("a\nb")) if t.type.endswith("break")] == ["hardbreak"]


def test_code_text_is_one_code_span():
    for text in ["C:\\a\\b", "a`b``c", "`x`", "![x](http://e.example/)", "two\nlines"]:
        out = code_text(text)
        assert code_contents(out) == [" ".join(text.splitlines())]
        assert_inert(out)


# ---------------------------------------------------------------- through Streamlit

def test_streamlit_elements_carry_only_inert_markdown():
    from streamlit.testing.v1 import AppTest

    reply = "\n\n".join(SNIPPETS + CODE) + "\n\n[r]: http://e.example/r.png"
    path = "C:\\tmp\\![x](http://e.example/p.png) <img src=http://e.example/q.png>"
    at = AppTest.from_string(f"""
import streamlit as st
{IMPORT}
st.markdown(model_markdown({reply!r}))
st.error("Could not load: " + plain_text({path!r}))
st.caption(plain_text({path!r}))
""").run(timeout=30)
    assert not at.exception
    bodies = [at.markdown[0].value, at.error[0].value, at.caption[0].value]
    for body in bodies:
        assert_inert(body)
    assert code_contents(bodies[0])[-1] == code_contents(CODE[-1])[-1]
