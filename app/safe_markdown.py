"""Untrusted text for Streamlit's Markdown elements (st.markdown, st.error, st.info, st.caption, ...).

Text typed by visitors or written by the model is shown to every visitor, so it must not become markup
that makes their browser fetch something, or a link that hides where it goes.

- `plain_text(s)`: any string shown literally (error messages, paths, titles): every ASCII punctuation
  character is backslash-escaped, so no Markdown, HTML, LaTeX or Streamlit directive survives. It can sit
  anywhere in a Markdown string except inside code or a link.
- `code_text(s)`: a string shown as one inline code span, whatever backticks it holds.
- `model_markdown(s)`: model output (or a prompt) with its formatting (headings, lists, emphasis, tables,
  quotes, code, LaTeX in \\( \\) and \\[ \\]) but no images, raw HTML or hidden link targets. The text is
  parsed with markdown-it-py and written out again as canonical Markdown in which all text is escaped:
    ![alt](url), ![alt][ref], <img src=url alt=alt>  ->  plain text "🖼 alt (url)"
    [text](url) with http, https or mailto           ->  "text (<url>)": a link whose visible text is the address
    [text](url) with any other scheme, or a path     ->  plain text "text (url)"
    other raw HTML (<script>, <iframe>, ...)         ->  shown literally, as text
    code (fenced, indented, inline)                  ->  code, its content untouched
    \\( x \\), \\[ x \\] inside a line, \\[ x \\] as lines  ->  $x$, $$x$$, a $$ block (a literal $ stays a dollar)
  Streamlit's own syntax in text (:red[..], :help[..], :material/..:, :streamlit:) is escaped too.
  Streamlit still turns an address written as text into a link; its visible text is then the address.
  The result is whole blocks: give it to st.markdown alone or after a blank line ("**Bot**\n\n" + ...),
  never inside a line of other Markdown, where a code block at its start would stop being code. Text
  appended to its end (a streaming cursor: model_markdown(text) + " ▌") is harmless.
"""
import re

from markdown_it import MarkdownIt

_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")               # every ASCII punctuation character
_SHORTCODE = re.compile(r":(?=[A-Za-z_][\w+-]*:)")       # :smile:, :streamlit: (Streamlit swaps them for emoji, a logo)
_LOGO = re.compile(r":(?=streamlit:)")
_LINKABLE = re.compile(r"(?ai)(?:https?|mailto):[\w\-.~:/?#@!&'()*+,;=%]*")   # safe to write as an <autolink>
# Math text that would be Markdown again if the page's renderer ever left it unparsed: a $ or backtick
# ends math or code early, an image, a link or reference, a directive with a label or attributes, the logo.
_RISKY_MATH = re.compile(r"[$`]|!\[|\][(\[:]|:[A-Za-z][\w-]*[\[{]|:streamlit:|\\\Z")
_IMG_TAG = re.compile(r"<img\b[^>]*>", re.I)
_IMG_ATTR = re.compile(r"""\b(src|alt)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)


def _escape(text: str, shortcodes: bool = False) -> str:
    """Backslash-escape all punctuation; break :streamlit: (or every :shortcode:) with an invisible word joiner."""
    text = (_SHORTCODE if shortcodes else _LOGO).sub(":\u2060", text)
    return _PUNCT.sub(r"\\\1", text)


def plain_text(text: str) -> str:
    """`text` shown literally by any Markdown-rendering element; its line breaks and indentation are kept."""
    lines = []
    for line in str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        body = line.lstrip(" \t")
        lines.append("&nbsp;" * len(line[:len(line) - len(body)].expandtabs(4)) + _escape(body, shortcodes=True))
    return "  \n".join(lines)


def code_text(text: str) -> str:
    """`text` as one inline code span (line breaks become spaces)."""
    return _code(" ".join(str(text).splitlines()))


def _code(code: str, table: bool = False) -> str:
    if table and "|" in code:
        if "\\" in code:                                  # "\|" would not survive GFM's cell splitting
            return _escape(code)
        code = code.replace("|", "\\|")
    ticks = "`" * (max(map(len, re.findall("`+", code)), default=0) + 1)
    pad = " " if code[:1] == "`" or code[-1:] == "`" or (code[:1] == code[-1:] == " " and code.strip()) else ""
    return f"{ticks}{pad}{code}{pad}{ticks}"


def _fence(code: str, info: str) -> str:
    ticks = "`" * max(3, max(map(len, re.findall("`+", code)), default=0) + 1)
    lang = next((w for w in info.split()[:1] if re.fullmatch(r"[\w+#.-]+", w)), "")   # the language only
    end = "" if code.endswith("\n") or not code else "\n"
    return f"{ticks}{lang}\n{code}{end}{ticks}"


def _math(tok, inline: bool, table: bool = False) -> str:
    body = tok.content.strip()
    if inline:
        body = re.sub(r"\s*\n\s*", " ", body)
    if not body or _RISKY_MATH.search(body) or (table and "|" in body):   # shown as the source text
        source = tok.markup + tok.content + ("\\)" if tok.markup == "\\(" else "\\]")
        return plain_text(source)
    body = re.sub(r"<(?=[A-Za-z/!?])", r"\\lt ", body)   # a < that would start HTML if left untypeset
    if not inline:   # each line indented: were the page to leave it untypeset, no line could start a block
        return "$$\n" + "\n".join("    " + ln.strip() for ln in body.split("\n") if ln.strip()) + "\n$$"
    return f"${body}$" if tok.markup == "\\(" else f"$${body}$$"


def _html(html: str) -> str:
    """Raw HTML shown as text, an <img> tag as the image's alt text and address."""
    def img(m):
        attrs = {k.lower(): a or b or c for k, a, b, c in _IMG_ATTR.findall(m.group(0))}
        return _image_text(attrs.get("alt", ""), attrs.get("src", ""))
    return plain_text(_IMG_TAG.sub(img, html))


def _image_text(alt: str, src: str) -> str:
    return f"🖼 {alt} ({src})" if alt else f"🖼 ({src})"


def _plain(tokens) -> str:
    """The visible text of inline tokens, as an HTML renderer would put it in an alt attribute."""
    return "".join(_plain(t.children or []) if t.type == "image" else t.content
                   for t in tokens if t.type in ("text", "code_inline", "image", "math_inline"))


def _inline(tokens, table: bool = False, one_line: bool = False) -> str:
    out, text, links = [], [], []        # links: (href, is an autolink, index in out, index in tokens)

    def put(s: str = "", raw: bool = False):
        if text:
            out.append(_escape("".join(text)))
            text.clear()
        if raw and out and out[-1][-1:] == s[:1]:
            out.append(" ")               # two code spans (or formulas) side by side would merge their fences
        if s:
            out.append(s)

    for i, t in enumerate(tokens):
        if t.type == "text":
            text.append(t.content)
        elif t.type in ("softbreak", "hardbreak"):
            put(" " if one_line else "\n" if t.type == "softbreak" else "\\\n")
        elif t.type == "code_inline":
            put(_code(t.content, table), raw=True)
        elif t.type == "math_inline":
            put(_math(t, inline=True, table=table), raw=True)
        elif t.type in ("em_open", "em_close", "strong_open", "strong_close", "s_open", "s_close"):
            put({"em": "*", "strong": "**", "s": "~~"}[t.type.rsplit("_", 1)[0]])
        elif t.type == "image":
            text.append(_image_text(_plain(t.children or []), t.attrGet("src") or ""))
        elif t.type == "html_inline":
            put(_html(t.content))
        elif t.type == "link_open":
            put()
            links.append((t.attrGet("href") or "", t.markup == "autolink", len(out), i))
        elif t.type == "link_close" and links:
            put()
            href, auto, start, first = links.pop()
            label, shown = "".join(out[start:]).strip(), _plain(tokens[first + 1:i]).strip()
            link = f"<{href}>" if _LINKABLE.fullmatch(href) and ":streamlit:" not in href else _escape(href)
            same = auto or not shown or shown in (href, href.removeprefix("mailto:"))
            out[start:] = [link if same else f"{label} {_escape('(')}{link}{_escape(')')}"]
    put()
    return "".join(out)


def _display_math_block(state, start, end, silent) -> bool:
    """\\[ at the start of a line up to a line ending in \\]: one display formula, whatever its lines hold."""
    if state.sCount[start] - state.blkIndent >= 4:
        return False
    line, rest = start, state.src[state.bMarks[start] + state.tShift[start]:state.eMarks[start]]
    if not rest.startswith("\\["):
        return False
    body, rest = [], rest[2:]
    while (close := rest.find("\\]")) < 0:
        body.append(rest)
        line += 1
        if line >= end or (state.sCount[line] < state.blkIndent and not state.isEmpty(line)):
            return False
        rest = state.src[state.bMarks[line] + state.tShift[line]:state.eMarks[line]]
    if rest[close + 2:].strip() or "`" in "".join(body) + rest[:close]:
        return False
    if not silent:
        tok = state.push("math_block", "math", 0)
        tok.content, tok.markup, tok.map = "\n".join(body + [rest[:close]]), "\\[", [start, line + 1]
        state.line = line + 1
    return True


def _math_inline(state, silent) -> bool:
    """\\( ... \\) and \\[ ... \\] inside a line, before backslash escapes would eat the backslash."""
    opener = state.src[state.pos:state.pos + 2]
    if opener not in ("\\(", "\\["):
        return False
    close = state.src.find("\\)" if opener == "\\(" else "\\]", state.pos + 2)
    if close < 0 or "`" in state.src[state.pos:close]:              # code spans come first
        return False
    if not silent:
        tok = state.push("math_inline", "math", 0)
        tok.content, tok.markup = state.src[state.pos + 2:close], opener
    state.pos = close + 2
    return True


_MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
_MD.block.ruler.before("fence", "display_math", _display_math_block,
                       {"alt": ["paragraph", "reference", "blockquote", "list"]})
_MD.inline.ruler.before("escape", "math_inline", _math_inline)


def _blocks(tokens, i: int, close: str | None = None):
    """Markdown for the blocks from tokens[i] up to the token of type `close`: (list of blocks, index after)."""
    out = []
    while i < len(tokens) and tokens[i].type != close:
        t = tokens[i]
        if t.type in ("paragraph_open", "heading_open"):
            body = _inline(tokens[i + 1].children, one_line=t.type == "heading_open")
            out.append(body if t.tag == "p" else f"{'#' * int(t.tag[1])} {body}")
            i += 3
            continue
        if t.type in ("fence", "code_block"):
            out.append(_fence(t.content, t.info))
        elif t.type == "math_block":
            out.append(_math(t, inline=False))
        elif t.type == "html_block":
            out.append(_html(t.content.rstrip("\n")))
        elif t.type == "hr":
            out.append("***")
        elif t.type == "blockquote_open":
            inner, i = _blocks(tokens, i + 1, "blockquote_close")
            out.append(_indent("\n\n".join(inner), "> ", "> "))
        elif t.type in ("bullet_list_open", "ordered_list_open"):
            items, i = _list(tokens, i + 1, t.type.replace("open", "close"))
            out.append(items)
        elif t.type == "table_open":
            i = _table(tokens, i, out)
        i += 1
    return out, i


def _indent(block: str, first: str, rest: str) -> str:
    """Prefix the lines of a block (a list item marker, a quote's "> "); a blank line gets no trailing spaces."""
    lines = block.split("\n")
    return "\n".join((p + ln) if ln else p.rstrip() for p, ln in zip([first] + [rest] * len(lines), lines))


def _list(tokens, i: int, close: str):
    level, end = tokens[i - 1].level, i
    while not (tokens[end].type == close and tokens[end].level == level):
        end += 1
    tight = all(t.hidden for t in tokens[i:end] if t.type == "paragraph_open" and t.level == level + 2)
    sep = "\n" if tight else "\n\n"
    items = []
    while tokens[i].type != close:
        item = tokens[i]                                  # list_item_open: info is the number of an ordered item
        blocks, i = _blocks(tokens, i + 1, "list_item_close")
        marker = f"{item.info}{item.markup} "
        items.append(_indent(sep.join(blocks), marker, " " * len(marker)))
        i += 1
    return sep.join(items), i


def _table(tokens, i: int, out: list) -> int:
    rows, aligns = [], []
    while tokens[i].type != "table_close":
        t = tokens[i]
        if t.type == "tr_open":
            rows.append([])
        elif t.type in ("th_open", "td_open"):
            if t.type == "th_open":
                aligns.append({"text-align:left": ":---", "text-align:right": "---:",
                               "text-align:center": ":---:"}.get(t.attrGet("style") or "", "---"))
            cell = tokens[i + 1]
            rows[-1].append(_inline(cell.children, table=True, one_line=True) if cell.type == "inline" else "")
        i += 1
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    out.append("\n".join(lines[:1] + ["| " + " | ".join(aligns) + " |"] + lines[1:]))
    return i


def model_markdown(text: str) -> str:
    """Model output (or a visitor's prompt) as Markdown for st.markdown: formatting, code and LaTeX kept;
    images, raw HTML, hidden link targets and Streamlit directives neutralised (see the module docstring)."""
    blocks, _ = _blocks(_MD.parse(str(text)), 0)
    return "\n\n".join(blocks)
