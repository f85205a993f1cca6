"""Chat: conversations kept in SQLite; replies come from the model service and go on if you leave the page."""
import json
import time

import streamlit as st

from app import runtime
from app.chat import ChatError, max_input_chars
from app_pages.ui import error, is_operator, model_markdown, plain_text, store_or_stop, visitor
from glm_core import GenerationParams
from storage import EVERYONE, InvalidImport, NotOwnerError

FINISH_NOTES = {"length": "cut at the length limit", "stopped": "stopped", "error": "failed"}
REDRAW_S = 0.3   # a streaming reply is drawn at most this often: rendering stays off the model's way

store = store_or_stop()
owner = visitor()
chat = runtime.chat()
models = runtime.models()
everyone = is_operator() and st.session_state.get("view_everyone", False)
reader = EVERYONE if everyone else owner


def current_conversation() -> dict | None:
    cid = st.session_state.get("conversation")
    if not cid:
        return None
    try:
        return store.get_conversation(cid, reader)
    except NotOwnerError:
        st.session_state.conversation = None
        return None


def open_conversation(cid: str | None) -> None:
    previous = st.session_state.get("conversation")
    if previous and previous != cid and chat.active(owner, previous) is None:
        models.forget(previous)   # its KV cache is rebuilt if the visitor comes back to it
    st.session_state.conversation = cid
    st.session_state.pop("editing", None)


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


def attempt(action, *args) -> None:
    """Run a chat action, showing why it could not be done instead of failing the page."""
    try:
        action(*args)
    except (ChatError, NotOwnerError) as e:
        st.session_state.notice_error = str(e)


def send(cid: str | None, text: str) -> None:
    try:
        cid, _ = chat.send(owner, text, cid, params=st.session_state.get("new_chat_params") or {},
                           system_prompt=st.session_state.get("new_chat_system", ""))
        open_conversation(cid)
    except (ChatError, NotOwnerError) as e:
        st.session_state.notice_error = str(e)


def watch(turn) -> None:
    """Show a reply while it is written (from where it is, for a visitor coming back); Stop ends it."""
    request = turn.request
    with st.chat_message("assistant"):
        body, status = st.empty(), st.empty()
        if turn.conversation_id and store.conversation_owner(turn.conversation_id) == owner:
            st.button("Stop", icon=":material/stop_circle:", key="stop", on_click=chat.stop,
                      args=(owner, turn.conversation_id))
        seen, drawn = -1, 0.0
        while not request.done:
            if request.status == "waiting":
                place = request.place
                why = (f"The model is busy with {models.held_for}" if models.held_for else
                       f"Loading {models.status.name}" if models.loading else "All places in the batch are taken")
                status.info(f"{why}: you are #{place} in line." if place else f"{why}.",
                            icon=":material/hourglass_top:")
            else:
                status.empty()
            if request.text and time.monotonic() - drawn >= REDRAW_S:
                body.markdown(model_markdown(request.text) + " ▌")
                drawn = time.monotonic()
            seen = request.wait(seen, timeout=REDRAW_S)
        turn.saved.wait(10)
    st.rerun()


def sidebar(conv: dict | None) -> None:
    with st.sidebar:
        if st.button("New chat", icon=":material/add:", width="stretch", type="primary"):
            open_conversation(None)
            st.rerun()
        if is_operator():
            st.toggle("Everyone's conversations", key="view_everyone",
                      help="Operator view: every visitor's conversations, read-only.")
        query = st.text_input("Search messages", placeholder="Search", label_visibility="collapsed")
        if query:
            hits = store.search(reader, query)
            st.caption(f"{len(hits)} messages match")
            for hit in hits[:20]:
                if st.button(f"{plain_text(hit['title'] or 'Untitled')} — {plain_text(hit['snippet'])}",
                             key=f"hit-{hit['message_id']}", width="stretch"):
                    open_conversation(hit["conversation_id"])
                    st.rerun()
        st.caption("Conversations")
        conversations = store.list_conversations(reader)
        if not conversations:
            st.caption("None yet: send a message to start one.")
        for c in conversations[:100]:
            selected = conv is not None and c["id"] == conv["id"]
            label = plain_text(c["title"] or "Untitled") + ("" if c["owner"] == owner else f" · {c['owner'][:6]}")
            if st.button(label, key=f"conv-{c['id']}", width="stretch", type="tertiary" if selected else "secondary",
                         icon=":material/chat_bubble:"):
                open_conversation(c["id"])
                st.rerun()
        with st.expander("Export / import"):
            st.download_button("All as JSON", json.dumps(store.export_conversations(reader), ensure_ascii=False, indent=1),
                               file_name="glm-studio-conversations.json", mime="application/json", width="stretch")
            st.download_button("All as Markdown", store.export_markdown(reader), file_name="glm-studio-conversations.md",
                               mime="text/markdown", width="stretch")
            upload = st.file_uploader("Import a JSON export", type="json")
            if upload is not None and st.button("Import", width="stretch"):
                try:
                    ids = store.import_conversations(upload.getvalue(), owner,
                                                     validate_params=lambda d: GenerationParams.checked(d).to_dict())
                    st.success(f"Imported {len(ids)} conversations.")
                except InvalidImport as e:
                    error(f"Not imported: {e}")


def conversation_menu(conv: dict, history: list[dict]) -> None:
    left, right = st.columns([6, 1], vertical_alignment="center")
    left.subheader(plain_text(conv["title"] or "Untitled"))
    with right.popover("", icon=":material/more_horiz:", width="stretch"):
        name = (conv["title"] or "conversation")[:40]
        st.download_button("Export Markdown", store.export_markdown(reader, [conv["id"]]), icon=":material/download:",
                           file_name=f"{name}.md", mime="text/markdown", width="stretch")
        st.download_button("Export JSON", json.dumps(store.export_conversations(reader, [conv["id"]]), ensure_ascii=False,
                                                     indent=1),
                           icon=":material/download:", file_name=f"{name}.json", mime="application/json", width="stretch")
        if conv["owner"] != owner:
            return
        title = st.text_input("Title", value=conv["title"], key=f"title-{conv['id']}", max_chars=200)
        if st.button("Rename", icon=":material/edit:", width="stretch") and title.strip():
            store.rename_conversation(conv["id"], owner, title.strip())
            st.rerun()
        if st.button("Clear messages", icon=":material/mop:", width="stretch", disabled=not history):
            attempt(chat.clear, owner, conv["id"])
            st.rerun()
        if st.button("Delete conversation", icon=":material/delete:", width="stretch"):
            attempt(chat.delete, owner, conv["id"])
            open_conversation(None)
            st.rerun()


def context_meter(conv: dict | None, history: list[dict]) -> None:
    engine = models.engine
    if engine is None:
        return
    system = [{"role": "system", "content": conv["system_prompt"]}] if conv and conv["system_prompt"] else []
    messages = system + [{"role": m["role"], "content": m["content"]} for m in history]
    used = len(engine.prompt_ids(messages + [{"role": "user", "content": ""}]))
    limit = engine.context_length
    st.progress(min(used / limit, 1.0), text=plain_text(f"Context: {used:,} of {limit:,} tokens "
                                                        f"({engine.name}, {engine.precision})"))


conv = current_conversation()
prompt = st.chat_input("Message GLM Studio", max_chars=max_input_chars(),
                       disabled=conv is not None and conv["owner"] != owner)
if prompt:   # the box stays at the bottom of the page, also while a reply streams
    send(conv["id"] if conv else None, prompt)
    st.rerun()
sidebar(conv)
read_only = conv is not None and conv["owner"] != owner
history = store.messages(conv["id"], reader) if conv else []
turn = chat.active(reader, conv["id"]) if conv else None

if conv is None:
    st.title("Chat")
    st.caption("Ask anything. Replies stream as they are written and keep being written if you open another page; "
               "Stop keeps what was written so far.")
else:
    conversation_menu(conv, history)
    if read_only:
        st.info(f"Read-only: another visitor's conversation ({conv['owner'][:6]}), shown to you as the operator.",
                icon=":material/visibility:")
    with st.expander("System prompt", icon=":material/settings_suggest:"):
        system = st.text_area("Instructions the model follows in this conversation", value=conv["system_prompt"],
                              key=f"system-{conv['id']}", label_visibility="collapsed", disabled=read_only,
                              placeholder="e.g. You are a concise assistant who answers in English.", max_chars=20_000)
        if system != conv["system_prompt"] and not read_only:
            store.update_conversation(conv["id"], owner, system_prompt=system)
            conv["system_prompt"] = system
        st.caption("ChatGLM3 has a native system role; for ChatGLM-6B and ChatGLM2-6B it is put before the first message.")

if notice := st.session_state.pop("notice_error", None):
    error(notice)

shown = [m for m in history if turn is None or m["id"] != turn.reply_id]
last_user = max((i for i, m in enumerate(shown) if m["role"] == "user"), default=None)
for i, m in enumerate(shown):
    with st.chat_message(m["role"]):
        if m["role"] == "user" and i == last_user and st.session_state.get("editing") == m["id"]:
            edited = st.text_area("Edit your message", value=m["content"], key=f"edit-{m['id']}",
                                  max_chars=max_input_chars())
            a, b, _ = st.columns([1, 1, 4])
            if a.button("Resend", type="primary", icon=":material/send:"):
                st.session_state.pop("editing")
                attempt(chat.resend, owner, conv["id"], m["id"], edited)
                st.rerun()
            if b.button("Cancel"):
                st.session_state.pop("editing")
                st.rerun()
            continue
        st.markdown(model_markdown(m["content"]) if m["content"] else "*(no text)*")
        if m["role"] == "assistant":
            if m.get("error"):
                error(m["error"])
            st.caption(stats_line(m))
            dropped = (m.get("stats") or {}).get("dropped_turns")
            if dropped:
                st.caption(f"The conversation is longer than the model's context: the oldest {dropped} messages "
                           f"were left out of this reply.")
        if read_only or turn is not None:
            continue
        last = i == len(shown) - 1
        if last and m["role"] == "assistant" and st.button("Regenerate", icon=":material/refresh:", key="regen"):
            attempt(chat.regenerate, owner, conv["id"])
            st.rerun()
        if i == last_user and (last or shown[-1]["role"] == "assistant") and \
                st.button("Edit", icon=":material/edit:", key=f"edit-btn-{m['id']}"):
            st.session_state.editing = m["id"]
            st.rerun()

context_meter(conv, history)
if turn is not None:
    watch(turn)
