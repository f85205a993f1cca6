"""Chat: conversations kept in SQLite, replies streamed token by token, stop / regenerate / edit."""
import json
import threading
import time

import streamlit as st

from glm_core import GenerationParams, PromptTooLongError, ReplyStats
from studio import engine_or_stop, get_manager, is_admin, render_markdown, store_or_stop, visitor_id

FINISH_NOTES = {"length": "cut at the length limit", "stopped": "stopped by you", "error": "failed"}

store = store_or_stop()
owner = visitor_id()
manager = get_manager()


def current_conversation() -> dict | None:
    cid = st.session_state.get("conversation")
    conv = store.get_conversation(cid) if cid else None
    if conv is None or (conv["owner"] != owner and not is_admin()):
        st.session_state.conversation = None
        return None
    return conv


def open_conversation(cid: str | None) -> None:
    st.session_state.conversation = cid
    st.session_state.pop("editing", None)


def chat_messages(conv: dict, history: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": conv["system_prompt"]}] if conv["system_prompt"] else []
    return system + [{"role": m["role"], "content": m["content"]} for m in history]


def stats_line(m: dict) -> str:
    facts = []
    if m.get("new_tokens"):
        facts.append(f"{m['new_tokens']} tokens")
    if m.get("ttft_s") is not None:
        facts.append(f"first token {m['ttft_s']:.2f} s")
    if m.get("decode_tok_s"):
        facts.append(f"{m['decode_tok_s']:.1f} tokens/s")
    note = FINISH_NOTES.get(m.get("finish_reason"), "")
    if m.get("finish_reason") is None:
        note = "unfinished (the server stopped)"
    if note:
        facts.append(note)
    return " · ".join(facts)


def settle_previous_reply() -> None:
    """A click during a reply starts a new run while the old one is still ending (Streamlit's fast
    reruns): stop that reply and wait until it is saved, so the page shows it as it ended."""
    pending = st.session_state.pop("streaming", None)
    if pending is None:
        return
    cid, message_id, stop = pending
    stop.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(m["id"] == message_id and m["finish_reason"] for m in store.messages(cid)):
            return
        time.sleep(0.05)


def respond(conv: dict, history: list[dict]) -> None:
    """Stream a reply to the last message into the page and into the database as it comes."""
    engine = engine_or_stop()
    params = GenerationParams.from_dict(conv["params"]) if conv["params"] else engine.default_params
    if not conv["model"]:
        store.update_conversation(conv["id"], model=engine.name, precision=engine.precision)
    stats = ReplyStats()
    with st.chat_message("assistant"):
        body = st.empty()
        st.button("Stop", icon=":material/stop_circle:", key="stop")   # a click reruns the page, which ends the stream
        reply = store.begin_reply(conv["id"])
        stop = threading.Event()
        st.session_state.streaming = (conv["id"], reply.message_id, stop)
        text = ""
        try:
            stream = manager.stream_chat(chat_messages(conv, history), params, stop, stats,
                                         on_wait=lambda place: body.info(f"Another reply is being written; you are #{place} in line."))
            for delta in stream:
                text += delta
                reply.append(delta)
                body.markdown(render_markdown(text) + " ▌")
            reply.finish(stats.finish_reason, stats.to_dict())
            st.session_state.pop("streaming", None)
        except PromptTooLongError as e:
            reply.finish("error", stats.to_dict(), error=str(e))
        except Exception as e:  # noqa: BLE001 - saved with the reply and shown in the page
            reply.finish("error", stats.to_dict(), error=f"{type(e).__name__}: {e}")
        except BaseException:   # Stop clicked, another widget used, or the tab closed: keep the partial reply
            reply.finish("stopped", stats.to_dict())
            raise
    if stats.dropped_turns:
        st.session_state.notice = (f"The conversation is longer than the model's context: the oldest "
                                   f"{stats.dropped_turns} messages were left out of this reply.")
    st.rerun()


def sidebar(conv: dict | None) -> None:
    with st.sidebar:
        if st.button("New chat", icon=":material/add:", width="stretch", type="primary"):
            open_conversation(None)
            manager.reset_cache()
            st.rerun()
        everyone = is_admin() and st.toggle("All visitors' conversations", help="Admin view: you know the access password.")
        query = st.text_input("Search messages", placeholder="Search", label_visibility="collapsed")
        if query:
            hits = store.search(None if everyone else owner, query)
            st.caption(f"{len(hits)} messages match")
            for hit in hits[:20]:
                if st.button(f"**{hit['title'] or 'Untitled'}** — {hit['snippet']}", key=f"hit-{hit['message_id']}",
                             width="stretch"):
                    open_conversation(hit["conversation_id"])
                    st.rerun()
        st.caption("Conversations")
        conversations = store.list_conversations(None if everyone else owner)
        if not conversations:
            st.caption("None yet: send a message to start one.")
        for c in conversations[:100]:
            selected = conv is not None and c["id"] == conv["id"]
            label = c["title"] or "Untitled"
            if st.button(label, key=f"conv-{c['id']}", width="stretch",
                         type="secondary" if not selected else "tertiary", icon=":material/chat_bubble:"):
                open_conversation(c["id"])
                st.rerun()
        with st.expander("Export / import"):
            mine = None if everyone else owner
            st.download_button("All as JSON", json.dumps(store.export_conversations(owner=mine), ensure_ascii=False, indent=1),
                               file_name="glm-studio-conversations.json", mime="application/json", width="stretch")
            st.download_button("All as Markdown", store.export_markdown(owner=mine), file_name="glm-studio-conversations.md",
                               mime="text/markdown", width="stretch")
            upload = st.file_uploader("Import a JSON export", type="json")
            if upload is not None and st.button("Import", width="stretch"):
                try:
                    ids = store.import_conversations(upload.getvalue(), owner)
                    st.success(f"Imported {len(ids)} conversations.")
                except (ValueError, KeyError, TypeError) as e:
                    st.error(f"Not a GLM Studio export: {e}")


def conversation_menu(conv: dict, history: list[dict]) -> None:
    left, right = st.columns([6, 1], vertical_alignment="center")
    left.subheader(conv["title"] or "Untitled")
    with right.popover("", icon=":material/more_horiz:", width="stretch"):
        title = st.text_input("Title", value=conv["title"], key=f"title-{conv['id']}")
        if st.button("Rename", icon=":material/edit:", width="stretch") and title.strip():
            store.rename_conversation(conv["id"], title.strip())
            st.rerun()
        st.download_button("Export Markdown", store.export_markdown([conv["id"]]), icon=":material/download:",
                           file_name=f"{(conv['title'] or 'conversation')[:40]}.md", mime="text/markdown",
                           width="stretch")
        st.download_button("Export JSON", json.dumps(store.export_conversations([conv["id"]]), ensure_ascii=False, indent=1),
                           icon=":material/download:", file_name=f"{(conv['title'] or 'conversation')[:40]}.json",
                           mime="application/json", width="stretch")
        if st.button("Clear messages", icon=":material/mop:", width="stretch", disabled=not history):
            store.delete_messages_from(history[0]["id"])
            manager.reset_cache()
            st.rerun()
        if st.button("Delete conversation", icon=":material/delete:", width="stretch"):
            store.delete_conversation(conv["id"])
            manager.reset_cache()
            open_conversation(None)
            st.rerun()


def context_meter(conv: dict | None, history: list[dict]) -> None:
    engine = manager.engine
    if engine is None:
        return
    messages = chat_messages(conv, history) if conv else []
    used = len(engine.prompt_ids(messages + [{"role": "user", "content": ""}]))
    limit = engine.context_length
    st.progress(min(used / limit, 1.0), text=f"Context: {used:,} of {limit:,} tokens ({engine.name}, {engine.precision})")


settle_previous_reply()
conv = current_conversation()
sidebar(conv)
history = store.messages(conv["id"]) if conv else []

if conv is None:
    st.title("Chat")
    st.caption("Ask anything. Replies stream as they are written; Stop keeps what was written so far.")
else:
    conversation_menu(conv, history)
    with st.expander("System prompt", icon=":material/settings_suggest:"):
        system = st.text_area("Instructions the model follows in this conversation", value=conv["system_prompt"],
                              key=f"system-{conv['id']}", label_visibility="collapsed",
                              placeholder="e.g. You are a concise assistant who answers in English.")
        if system != conv["system_prompt"]:
            store.update_conversation(conv["id"], system_prompt=system)
            conv["system_prompt"] = system
        st.caption("ChatGLM3 has a native system role; for ChatGLM-6B and ChatGLM2-6B it is put before the first message.")

if notice := st.session_state.pop("notice", None):
    st.info(notice, icon=":material/content_cut:")

last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
for i, m in enumerate(history):
    with st.chat_message(m["role"]):
        if m["role"] == "user" and i == last_user and st.session_state.get("editing") == m["id"]:
            edited = st.text_area("Edit your message", value=m["content"], key=f"edit-{m['id']}")
            a, b, _ = st.columns([1, 1, 4])
            if a.button("Resend", type="primary", icon=":material/send:"):
                store.delete_messages_from(m["id"])
                store.add_message(conv["id"], "user", edited)
                st.session_state.pop("editing")
                st.session_state.respond = True
                st.rerun()
            if b.button("Cancel"):
                st.session_state.pop("editing")
                st.rerun()
            continue
        st.markdown(render_markdown(m["content"]) if m["content"] else "*(no text)*")
        if m["role"] == "assistant":
            if m.get("error"):
                st.error(m["error"])
            st.caption(stats_line(m))
        last = i == len(history) - 1
        if last and m["role"] == "assistant" and st.button("Regenerate", icon=":material/refresh:", key="regen"):
            store.delete_messages_from(m["id"])
            st.session_state.respond = True
            st.rerun()
        if i == last_user and (last or history[-1]["role"] == "assistant") and \
                st.button("Edit", icon=":material/edit:", key=f"edit-btn-{m['id']}"):
            st.session_state.editing = m["id"]
            st.rerun()

prompt = st.chat_input("Message GLM Studio")
if prompt:
    if conv is None:
        cid = store.create_conversation(owner, title=" ".join(prompt.split())[:60],
                                        params=st.session_state.get("new_chat_params") or {},
                                        system_prompt=st.session_state.get("new_chat_system", ""))
        open_conversation(cid)
        conv = store.get_conversation(cid)
    store.add_message(conv["id"], "user", prompt)
    history = store.messages(conv["id"])
    with st.chat_message("user"):
        st.markdown(render_markdown(prompt))
    respond(conv, history)
elif st.session_state.pop("respond", False) and conv is not None:
    respond(conv, history)

context_meter(conv, history)
