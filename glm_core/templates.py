"""Chat prompts of the ChatGLM family as the official chat() builds them, and its clean-up of the reply.

Messages are dicts {"role": "system" | "user" | "assistant" | "observation", "content": str}; a system
message may carry "tools" (folded into its text as the official v3 build_chat_input does) and an assistant
message "metadata" (v3). The last message is the new user (or v3 observation) turn.
"""
from __future__ import annotations

import json
import re

ROLES = ("system", "user", "assistant", "observation")
# v1 turns ASCII punctuation next to a CJK character into its full-width form.
V1_PUNCTUATION = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")]
CJK = r"[\u4e00-\u9fff]"


def message_text(message: dict) -> str:
    """The content, with a system message's tools appended as official build_chat_input does."""
    content = message["content"]
    if message["role"] == "system" and "tools" in message:
        content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return content


def prompt_ids(tok, version: int, messages: list[dict]) -> list[int]:
    """The ids the official chat() feeds the model for this conversation.

    v3: [gMASK] sop, then per message <|role|> + sp(metadata + "\\n") + sp(content), then <|assistant|>.
    v1/v2 have no system role: the system text (all system messages, joined by blank lines) is put in front of
    the first user turn as system + "\\n\\n" + query, and the rest becomes the official "[Round N]" prompt.
    """
    bad = [m.get("role") for m in messages if m.get("role") not in ROLES]
    if bad:
        raise ValueError(f"unknown message roles {bad}; use one of {ROLES}")
    if not messages or messages[-1]["role"] not in ("user", "observation"):
        raise ValueError("the last message must be the new user (or observation) turn")
    if version == 3:
        return v3_prompt_ids(tok, messages)
    query, history = rounds(messages)
    return tok.encode(round_prompt(version, query, history), add_special_tokens=True)


def v3_prompt_ids(tok, messages: list[dict]) -> list[int]:
    ids = [tok.special_ids["[gMASK]"], tok.special_ids["sop"]]
    for i, m in enumerate(messages):
        metadata = m.get("metadata", "") if i < len(messages) - 1 else ""  # the new turn never has any
        ids += [tok.special_ids[f"<|{m['role']}|>"]] + tok.sp_encode(f"{metadata}\n") + tok.sp_encode(message_text(m))
    return ids + [tok.special_ids["<|assistant|>"]]


def rounds(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(query, [(old query, reply), ...]) for v1/v2, the system text in front of the first user turn."""
    system = "\n\n".join(message_text(m) for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise ValueError("ChatGLM v1/v2 chats alternate user and assistant turns and end with a user turn "
                         "(they have no observation role)")
    texts = [m["content"] for m in turns]
    if system:
        texts[0] = system + "\n\n" + texts[0]
    return texts[-1], list(zip(texts[0:-1:2], texts[1:-1:2]))


def round_prompt(version: int, query: str, history: list[tuple[str, str]]) -> str:
    """The official v1 chat() / v2 build_prompt text."""
    if version == 1:
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："
    if version == 2:
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    raise ValueError(f"round prompts exist for ChatGLM v1 and v2, not v{version}")


def clean_response(version: int, text: str) -> str:
    """What the official chat() does to the decoded reply (its process_response).

    v1: strip, "[[训练时间]]" -> "2023年", ASCII , ! : ; ? next to a CJK character -> full width.
    v2: strip and the same date replacement.
    v3: the reply after the last <|assistant|> is "metadata\\ncontent". Empty metadata: strip the content and
    replace the date. Otherwise it is a tool call, which official chat() returns as a dict; here the text is
    kept as it is, for the caller to show or parse.
    """
    if version == 3:
        reply = text.split("<|assistant|>")[-1]
        metadata, content = reply.split("\n", 1) if "\n" in reply else ("", reply)
        if metadata.strip():
            return text
        return content.strip().replace("[[训练时间]]", "2023年")
    text = text.strip().replace("[[训练时间]]", "2023年")
    if version == 1:
        for ascii_mark, full_width in V1_PUNCTUATION:
            text = re.sub(f"({CJK}){ascii_mark}", rf"\1{full_width}", text)
            text = re.sub(f"{ascii_mark}({CJK})", rf"{full_width}\1", text)
    return text
