"""The chat turn: the one path the chat page, the terminal chat and the HTTP API take.

A turn checks who owns the conversation (the store checks it too), starts the conversation when there is none,
saves the user's message, asks the model service for the reply and saves the reply while it streams, from a
thread of its own: the reply does not depend on the page that asked for it, and a killed server loses at most
about a second of it. When the reply ends it is saved cleaned (the model's own clean-up), with its finish reason
(stop, length, stopped, error) and its stats. A prompt that cannot fit the context, or a full queue, becomes a
failed reply with the reason, so the conversation keeps its shape (each question has its answer).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from glm_core import GenerationParams, PromptTooLongError
from glm_core.service import ModelService, Request, ServiceBusy
from storage import EVERYONE, NotOwnerError, Store

log = logging.getLogger(__name__)

MAX_INPUT_CHARS = 20_000   # one message; GLM_STUDIO_MAX_INPUT_CHARS overrides
TITLE_CHARS = 60


class ChatError(ValueError):
    """A turn that cannot start; the message says why, in words for the person who asked."""


def max_input_chars() -> int:
    value = os.environ.get("GLM_STUDIO_MAX_INPUT_CHARS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else MAX_INPUT_CHARS


def title_of(text: str) -> str:
    return " ".join(text.split())[:TITLE_CHARS]


def prompt_messages(conversation: dict, history: list[dict]) -> list[dict]:
    """What the model reads: the system prompt, then the turns (failed replies, which have no text, left out)."""
    system = [{"role": "system", "content": conversation["system_prompt"]}] if conversation["system_prompt"] else []
    turns = [{"role": m["role"], "content": m["content"]} for m in history
             if not (m["role"] == "assistant" and m["finish_reason"] == "error" and not m["content"])]
    return system + turns


@dataclass(eq=False)
class Turn:
    """A reply on its way: the model service's request, and where it is saved (None when it is not)."""
    request: Request
    conversation_id: str | None = None
    reply_id: int | None = None
    saved: threading.Event = field(default_factory=threading.Event)   # the finished reply is in the store
    stop_strings: list[str] = field(default_factory=list)   # the reply ends before the first of these (API `stop`)


def first_stop(text: str, stops: list[str]) -> int:
    """Where the first of the stop strings begins in text; -1 when none is in it."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


class ChatService:
    def __init__(self, store: Store, models: ModelService):
        self.store, self.models = store, models
        self._turns: dict[str, Turn] = {}   # conversation id -> the turn being written
        self._lock = threading.Lock()

    # -- turns of a stored conversation ------------------------------------------------------------

    def send(self, owner: str, text: str, conversation_id: str | None = None, params: dict | None = None,
             system_prompt: str = "") -> tuple[str, Turn | None]:
        """Post the owner's message and start the reply. Without a conversation id a new conversation starts,
        with `params` and `system_prompt`. Returns (conversation id, turn; None when the reply failed at once)."""
        self.check_input(text)
        if conversation_id is None:
            conversation_id = self.store.create_conversation(owner, title=title_of(text), params=params or {},
                                                             system_prompt=system_prompt)
        self._check_idle(owner, conversation_id)
        self.store.add_message(conversation_id, owner, "user", text)
        return conversation_id, self._reply(owner, conversation_id)

    def regenerate(self, owner: str, conversation_id: str) -> Turn | None:
        """Replace the last reply with a new one."""
        self._check_idle(owner, conversation_id)
        history = self.store.messages(conversation_id, owner)
        if history and history[-1]["role"] == "assistant":
            self.store.delete_messages_from(conversation_id, owner, history[-1]["id"])
        return self._reply(owner, conversation_id)

    def resend(self, owner: str, conversation_id: str, message_id: int, text: str) -> Turn | None:
        """Replace one of the owner's messages (and everything after it) by an edited one, and reply to it."""
        self.check_input(text)
        self._check_idle(owner, conversation_id)
        self.store.delete_messages_from(conversation_id, owner, message_id)
        self.store.add_message(conversation_id, owner, "user", text)
        return self._reply(owner, conversation_id)

    def active(self, owner: object, conversation_id: str) -> Turn | None:
        """The reply being written in a conversation the owner may read (EVERYONE: the operator's view)."""
        with self._lock:
            turn = self._turns.get(conversation_id)
        if turn is None:
            return None
        if owner is not EVERYONE and self.store.conversation_owner(conversation_id) != owner:
            return None
        return turn

    def stop(self, owner: str, conversation_id: str) -> None:
        """End the reply being written; what was written is kept."""
        turn = self.active(owner, conversation_id)
        if turn is not None:
            turn.request.cancel()

    def clear(self, owner: str, conversation_id: str) -> None:
        """Delete every message of a conversation and free its KV cache."""
        self.stop(owner, conversation_id)
        self._wait_saved(conversation_id)
        history = self.store.messages(conversation_id, owner)
        if history:
            self.store.delete_messages_from(conversation_id, owner, history[0]["id"])
        self.models.forget(conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        """Delete a conversation for good and free its KV cache."""
        self.stop(owner, conversation_id)
        self._wait_saved(conversation_id)
        self.store.delete_conversation(conversation_id, owner)
        self.models.forget(conversation_id)

    # -- a reply to messages given whole (the HTTP API) ----------------------------------------------

    def reply_to(self, owner: str, messages: list[dict], params: GenerationParams | None = None,
                 log_as: str | None = None, stop_strings: list[str] | None = None) -> Turn:
        """Reply to messages given by the caller. With `log_as` the exchange (the last user message and the reply)
        is also saved, in the conversation of that name owned by `owner` (created on first use). The messages must
        fit the context as given (their caller chose them). Raises PromptTooLongError / ServiceBusy / ChatError
        instead of saving a failed reply."""
        for m in messages:
            self.check_input(m.get("content", ""))
        request = self.models.submit(messages, params, owner=owner, whole=True)
        turn = Turn(request, stop_strings=list(stop_strings or []))
        if log_as is not None:
            turn.conversation_id = self._logged_conversation(owner, log_as)
            if messages and messages[-1]["role"] == "user":
                self.store.add_message(turn.conversation_id, owner, "user", messages[-1]["content"])
            self._save_while_streaming(owner, turn, viewed=False)
        return turn

    # -- the parts ---------------------------------------------------------------------------------

    def check_input(self, text: object) -> None:
        if not isinstance(text, str):
            raise ChatError("a message is text")
        limit = max_input_chars()
        if len(text) > limit:
            raise ChatError(f"the message has {len(text):,} characters; the limit is {limit:,} "
                            f"(GLM_STUDIO_MAX_INPUT_CHARS)")

    def _check_idle(self, owner: str, conversation_id: str) -> None:
        self.store.get_conversation(conversation_id, owner)   # NotOwnerError when it is not the owner's
        if self.active(owner, conversation_id) is not None:
            raise ChatError("a reply is still being written in this conversation; stop it or wait for it")

    def _reply(self, owner: str, conversation_id: str) -> Turn | None:
        conversation = self.store.get_conversation(conversation_id, owner)
        messages = prompt_messages(conversation, self.store.messages(conversation_id, owner))
        params = GenerationParams.from_dict(conversation["params"]) if conversation["params"] else None
        try:
            request = self.models.submit(messages, params, owner=owner, key=conversation_id)
        except (PromptTooLongError, ServiceBusy) as e:
            reply = self.store.begin_reply(conversation_id, owner)
            reply.finish("error", None, error=str(e))
            return None
        turn = Turn(request, conversation_id)
        self._save_while_streaming(owner, turn)
        return turn

    def _save_while_streaming(self, owner: str, turn: Turn, viewed: bool = True) -> None:
        """Save the reply from a thread of its own; `viewed`: the conversation's pages show it while it streams."""
        reply = self.store.begin_reply(turn.conversation_id, owner)
        turn.reply_id = reply.message_id
        if viewed:
            with self._lock:
                self._turns[turn.conversation_id] = turn

        def save() -> None:
            request = turn.request
            try:
                for delta in request.deltas():
                    reply.append(delta)
            except Exception:  # noqa: BLE001 - the reply is still finished below, with what arrived
                log.exception("saving reply %s failed while it streamed", reply.message_id)
            finally:
                try:
                    reason, error = request.finish_reason or "error", request.error or None
                    cut = first_stop(request.text, turn.stop_strings)
                    text = request.text if cut < 0 else request.text[:cut]
                    if cut >= 0:   # the caller ended it there (the request was cancelled when the stop showed)
                        reason, error = "stop", None
                    cleaned = request.clean(text)
                    reply.finish(reason, request.stats.to_dict(), error,
                                 content=cleaned if cleaned != request.text else None)
                    if request.engine_name:
                        self.store.update_conversation(turn.conversation_id, owner, model=request.engine_name,
                                                       precision=request.precision)
                except NotOwnerError:
                    log.info("conversation %s was deleted while its reply streamed", turn.conversation_id)
                finally:
                    with self._lock:
                        if self._turns.get(turn.conversation_id) is turn:
                            del self._turns[turn.conversation_id]
                    turn.saved.set()
        threading.Thread(target=save, name=f"save-reply-{reply.message_id}", daemon=True).start()

    def _wait_saved(self, conversation_id: str, timeout: float = 10) -> None:
        with self._lock:
            turn = self._turns.get(conversation_id)
        if turn is not None:
            turn.saved.wait(timeout)

    def _logged_conversation(self, owner: str, name: str) -> str:
        title = f"API · {name}"[:TITLE_CHARS]
        for conversation in self.store.list_conversations(owner):
            if conversation["title"] == title:
                return conversation["id"]
        return self.store.create_conversation(owner, title=title)
