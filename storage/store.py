"""The GLM Studio store: conversations, messages (saved while they stream), search, export/import
and benchmark runs, in one SQLite file through sqlite-utils.

One `Store` is shared by every Streamlit session thread: it holds one connection
(check_same_thread=False) behind a lock; WAL mode and a busy timeout let other processes read and
write the same file at the same time.

Every method that reads or changes a conversation or its messages takes its owner, and checks it
with the read or the write itself; see storage/__init__.py.
"""

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

from sqlite_utils import Database

from .imports import Conversation, any_object, max_import_bytes, read_export
from .schema import (
    EXPORT_FORMAT, EXPORT_VERSION, FINISH_REASONS, MESSAGE_STATS, ROLES,
    NewerSchemaError, check_not_newer, migrate, write_transaction,
)

log = logging.getLogger(__name__)

CONVERSATION_FIELDS = ("title", "model", "precision", "system_prompt", "params")
BENCH_COLUMNS = (
    "model", "precision", "prompt_tokens", "new_tokens", "load_s", "peak_rss_gb",
    "prefill_tok_s", "decode_tok_s", "ttft_s", "top1_agreement", "mean_kl", "perplexity",
)
BENCH_STATUSES = ("done", "stopped", "error")
BUSY_TIMEOUT_S = 30.0
IMPORT_BATCH_CONVERSATIONS = 50
IMPORT_BATCH_CHARS = 2_000_000


class Everyone:
    """The type of EVERYONE, a sentinel no visitor id can equal."""

    def __repr__(self):
        return "EVERYONE"


EVERYONE = Everyone()  # the owner the operator's read-only view passes: everyone's conversations


class NotOwnerError(PermissionError):
    """No such conversation of this owner. The same whether it does not exist or is someone else's,
    so that a visitor cannot find out which ids exist."""


def check_owner(owner: object, reading: bool = False):
    """`owner` must be a visitor id; EVERYONE only for reading."""
    if owner is EVERYONE:
        if reading:
            return
        raise NotOwnerError("EVERYONE can read conversations, not change them")
    if not isinstance(owner, str):
        raise TypeError(f"owner must be a visitor id (a string), not {owner!r}")
    if not owner:
        raise ValueError("owner must be a visitor id, not empty")


def default_db_path() -> Path:
    """$GLM_STUDIO_DB, else $XDG_DATA_HOME/glm-studio/glm-studio.db, else ~/.local/share/glm-studio/glm-studio.db."""
    if os.environ.get("GLM_STUDIO_DB"):
        return Path(os.environ["GLM_STUDIO_DB"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "glm-studio" / "glm-studio.db"


def open_store(path: str | Path | None = None) -> "Store":
    return Store(path if path is not None else default_db_path())


_last_stamp = datetime.min.replace(tzinfo=timezone.utc)
_stamp_lock = threading.Lock()


def now() -> str:
    """The time, strictly later than any earlier call's: lists sort by these stamps ("most recently updated
    first"), and on a fast machine two updates fall in the same clock tick."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(datetime.now(timezone.utc), _last_stamp + timedelta(microseconds=1))
        return _last_stamp.isoformat(timespec="microseconds")


def connect(path: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)


def is_healthy(path: Path) -> bool:
    """Whether `path` is a sound SQLite database. Read-only, so checking changes nothing
    (no checkpoint of a leftover -wal into a damaged file)."""
    if not path.exists():
        return True
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        return conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError as e:
        # Only damage counts: a locked or busy database is someone else's open file, never moved.
        if e.sqlite_errorcode in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return False
        raise
    finally:
        conn.close()


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its -wal/-shm) to `<name>.corrupt-<UTC time>`; never overwrite."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    os.rename(path, target)
    for suffix in ("-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
    return target


def decode_json(row: dict, *keys: str) -> dict:
    for key in keys:
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


def message_fields(finish_reason: str | None, stats: dict | None, error: str | None) -> dict:
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    return {"finish_reason": finish_reason, "error": error, "stats": stats,
            **{key: (stats or {}).get(key) for key in MESSAGE_STATS}}


def message_record(role: str, content: str, finish_reason: str | None, stats: dict | None, error: str | None) -> dict:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {"role": role, "content": content, **message_fields(finish_reason, stats, error)}


def batches(conversations: list[Conversation]) -> Iterator[list[Conversation]]:
    """Import batches: at most IMPORT_BATCH_CONVERSATIONS conversations, and IMPORT_BATCH_CHARS of
    text unless one conversation alone has more."""
    batch, chars = [], 0
    for conv, messages in conversations:
        size = sum(len(m["content"]) for m in messages)
        if batch and (len(batch) == IMPORT_BATCH_CONVERSATIONS or chars + size > IMPORT_BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append((conv, messages))
        chars += size
    if batch:
        yield batch


def snippet(text: str, terms: list[str], width: int = 120) -> str:
    lowered = text.lower()
    hits = [lowered.find(t.lower()) for t in terms if t.lower() in lowered]
    start = max(0, min(hits, default=0) - width // 4)
    end = min(len(text), start + width)
    return ("…" if start else "") + " ".join(text[start:end].split()) + ("…" if end < len(text) else "")


class Store:
    """The database behind GLM Studio. `recovered_from` is the path a damaged file was moved to
    when this Store replaced it with a fresh one (None otherwise): the UI tells the user."""

    def __init__(self, target: str | Path | sqlite3.Connection = ":memory:"):
        self._lock = threading.RLock()
        self._replies: weakref.WeakSet[ReplyWriter] = weakref.WeakSet()
        self.recovered_from: Path | None = None
        self.path: Path | None = None
        if isinstance(target, sqlite3.Connection):
            conn = target
        elif str(target) == ":memory:":
            conn = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            self.path = Path(target).expanduser()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not is_healthy(self.path):
                self.recovered_from = move_aside(self.path)
                log.warning("GLM Studio database %s was damaged; moved to %s, starting a fresh one",
                            self.path, self.recovered_from)
            conn = connect(self.path)
        self.db = Database(conn)
        try:
            check_not_newer(self.db, str(self.path or "in memory"))
        except NewerSchemaError:
            if conn is not target:  # a connection the caller passed in stays theirs to close
                conn.close()
            raise
        if self.path is not None:
            self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a killed process loses no commit
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA secure_delete=ON")  # deleted text is overwritten, not just unlinked
        migrate(self.db)

    def close(self):
        """Save what the unfinished replies have so far, then close the connection."""
        for reply in list(self._replies):
            reply.flush()
        with self._lock:
            self.db.close()

    # conversations

    def _conversation(self, conversation_id: str, owner: str, reading: bool = False) -> dict:
        """The conversation's row if `owner` may read it (reading) or change it. Call holding the lock,
        inside the write's transaction when changing it."""
        check_owner(owner, reading)
        rows = list(self.db["conversations"].rows_where("id = ?", [conversation_id]))
        if not rows or (owner is not EVERYONE and rows[0]["owner"] != owner):
            raise NotOwnerError(f"no conversation {conversation_id!r} of yours")
        return rows[0]

    def conversation_owner(self, conversation_id: str) -> str | None:
        """Whose conversation this is (None: there is no such conversation), for the app's own checks."""
        with self._lock:
            rows = list(self.db["conversations"].rows_where("id = ?", [conversation_id], select="owner"))
        return rows[0]["owner"] if rows else None

    def create_conversation(self, owner: str, title: str = "", model: str = "", precision: str = "",
                            system_prompt: str = "", params: dict | None = None) -> str:
        check_owner(owner)
        stamp = now()
        record = {"id": uuid.uuid4().hex, "owner": owner, "title": title, "model": model, "precision": precision,
                  "system_prompt": system_prompt, "params": params or {}, "created_at": stamp, "updated_at": stamp}
        with self._lock:
            self.db["conversations"].insert(record)
        return record["id"]

    def list_conversations(self, owner: str) -> list[dict]:
        """Newest first; EVERYONE lists everyone's."""
        check_owner(owner, reading=True)
        where, args = (None, None) if owner is EVERYONE else ("owner = ?", [owner])
        with self._lock:
            rows = list(self.db["conversations"].rows_where(where, args, order_by="updated_at desc, rowid desc"))
        return [decode_json(row, "params") for row in rows]

    def get_conversation(self, conversation_id: str, owner: str) -> dict:
        with self._lock:
            return decode_json(self._conversation(conversation_id, owner, reading=True), "params")

    def update_conversation(self, conversation_id: str, owner: str, **fields):
        unknown = set(fields) - set(CONVERSATION_FIELDS)
        if unknown:
            raise TypeError(f"unknown conversation fields {sorted(unknown)}; known: {CONVERSATION_FIELDS}")
        with self._lock, write_transaction(self.db):
            self._conversation(conversation_id, owner)
            self.db["conversations"].update(conversation_id, {**fields, "updated_at": now()})

    def rename_conversation(self, conversation_id: str, owner: str, title: str):
        self.update_conversation(conversation_id, owner, title=title)

    def delete_conversation(self, conversation_id: str, owner: str):
        """Delete a conversation and its messages for good: rows, search index entries, and (with
        secure_delete, an FTS optimize and a WAL checkpoint) their bytes in the file."""
        with self._lock:
            with write_transaction(self.db):
                self._conversation(conversation_id, owner)
                self._delete([conversation_id])
            self.db["messages"].optimize()  # rewrites the index without the deleted entries
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _delete(self, conversation_ids: list[str]):
        """Delete conversations and their messages. Call inside a write transaction."""
        ids = [(cid,) for cid in conversation_ids]
        self.db.conn.executemany("delete from messages where conversation_id = ?", ids)
        self.db.conn.executemany("delete from conversations where id = ?", ids)

    # messages

    def messages(self, conversation_id: str, owner: str) -> list[dict]:
        with self._lock:
            self._conversation(conversation_id, owner, reading=True)
            return self._messages(conversation_id)

    def _messages(self, conversation_id: str) -> list[dict]:
        rows = self.db["messages"].rows_where("conversation_id = ?", [conversation_id], order_by="id")
        return [decode_json(row, "stats") for row in rows]

    def add_message(self, conversation_id: str, owner: str, role: str, content: str, finish_reason: str | None = None,
                    stats: dict | None = None, error: str | None = None) -> int:
        stamp = now()
        record = message_record(role, content, finish_reason, stats, error)
        record.update(conversation_id=conversation_id, created_at=stamp, updated_at=stamp)
        with self._lock, write_transaction(self.db):
            self._conversation(conversation_id, owner)
            message_id = self.db["messages"].insert(record).last_pk
            self.db["conversations"].update(conversation_id, {"updated_at": record["updated_at"]})
        return message_id

    def delete_messages_from(self, conversation_id: str, owner: str, message_id: int) -> int:
        """Delete a message of the conversation and every later one (regenerate, edit and resend);
        returns how many (0 when the message is not in that conversation).
        Their rows are overwritten; unlike delete_conversation it skips the index merge, which
        grows with the whole history, so index entries linger until SQLite merges them."""
        with self._lock, write_transaction(self.db):
            self._conversation(conversation_id, owner)
            if not self.db["messages"].count_where("conversation_id = ? and id = ?", [conversation_id, message_id]):
                return 0
            where, args = "conversation_id = ? and id >= ?", [conversation_id, message_id]
            count = self.db["messages"].count_where(where, args)
            self.db["messages"].delete_where(where, args)
        return count

    def begin_reply(self, conversation_id: str, owner: str, flush_seconds: float = 1.0,
                    flush_deltas: int = 32) -> "ReplyWriter":
        """Start an assistant reply, saved while it streams; see ReplyWriter. The owner is checked
        here; the reply's saves go by its message id."""
        message_id = self.add_message(conversation_id, owner, "assistant", "")
        reply = ReplyWriter(self, message_id, flush_seconds, flush_deltas)
        self._replies.add(reply)
        return reply

    def _save_reply(self, message_id: int, content: str, final: dict | None = None):
        with self._lock, write_transaction(self.db):
            rows = list(self.db["messages"].rows_where("id = ?", [message_id], select="conversation_id"))
            if not rows:
                log.info("reply %s not saved: its conversation was deleted while it streamed", message_id)
                return
            self.db["messages"].update(message_id, {"content": content, "updated_at": now(), **(final or {})})
            if final is not None:
                self.db["conversations"].update(rows[0]["conversation_id"], {"updated_at": now()})

    # search

    def search(self, owner: str, query: str, limit: int = 50) -> list[dict]:
        """Messages containing every word of `query` (any case), best match first (newest first when a
        word is shorter than 3 characters); EVERYONE searches everyone's.
        Hits: conversation_id, title, message_id, role, snippet."""
        check_owner(owner, reading=True)
        terms = query.replace('"', " ").split()
        if not terms:
            return []
        where, args = (None, {}) if owner is EVERYONE else (
            "conversation_id in (select id from conversations where owner = :owner)", {"owner": owner})
        columns = ["id", "conversation_id", "role", "content"]
        with self._lock:
            if all(len(t) >= 3 for t in terms):
                rows = list(self.db["messages"].search(" ".join(terms), columns=columns, limit=limit, quote=True,
                                                       where=where, where_args=args or None))
            else:  # trigrams cannot match words shorter than 3 characters (two-character Chinese words)
                likes = [f"content like :term{i} escape '\\'" for i in range(len(terms))]
                args.update({f"term{i}": "%" + t.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                             for i, t in enumerate(terms)})
                rows = list(self.db["messages"].rows_where(" and ".join(([where] if where else []) + likes), args,
                                                           select=", ".join(columns), order_by="id desc", limit=limit))
            titles = {c["id"]: c["title"] for c in self.db["conversations"].rows_where(select="id, title")}
        return [{"conversation_id": r["conversation_id"], "title": titles[r["conversation_id"]],
                 "message_id": r["id"], "role": r["role"], "snippet": snippet(r["content"], terms)} for r in rows]

    # export / import

    def _select_conversations(self, owner: str, conversation_ids: list[str] | None) -> list[dict]:
        check_owner(owner, reading=True)
        clauses, args = ([], []) if owner is EVERYONE else (["owner = ?"], [owner])
        if conversation_ids is not None:
            clauses.append(f"id in ({', '.join('?' * len(conversation_ids))})")
            args += list(conversation_ids)
        rows = list(self.db["conversations"].rows_where(" and ".join(clauses) or None, args,
                                                        order_by="created_at, rowid"))
        found = {row["id"] for row in rows}
        for cid in conversation_ids or []:
            if cid not in found:
                raise NotOwnerError(f"no conversation {cid!r} of yours")
        return rows

    def export_conversations(self, owner: str, conversation_ids: list[str] | None = None) -> dict:
        """A JSON-ready dict of the owner's conversations (EVERYONE: anyone's), or of those chosen.
        Owners are left out: an import takes the importer's."""
        with self._lock:
            conversations = []
            for conv in self._select_conversations(owner, conversation_ids):
                conv.pop("owner")
                conv["messages"] = [{k: v for k, v in m.items() if k not in ("id", "conversation_id")}
                                    for m in self._messages(conv["id"])]
                conversations.append(decode_json(conv, "params"))
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "conversations": conversations}

    def import_conversations(self, data: dict | str | bytes, owner: str,
                             validate_params: Callable[[object], dict] = any_object,
                             max_bytes: int | None = None) -> list[str]:
        """Import an export (a dict, or JSON text of at most `max_bytes` bytes, by default
        $GLM_STUDIO_MAX_IMPORT_MB or MAX_IMPORT_BYTES) for `owner`, all or nothing; returns the new ids.
        The whole document is checked first (InvalidImport says what is wrong; `validate_params(obj)
        -> dict` checks each conversation's params, raising ValueError), then written a batch of
        conversations per transaction, so that other visitors' replies are saved in between.
        Every field of the export format is required, and no other is accepted. Conversations keep
        their ids, timestamps and stats, so exporting them again gives the same export; an id
        already in this database gets a fresh one (the import is then a copy)."""
        check_owner(owner)
        conversations = read_export(data, validate_params, max_import_bytes() if max_bytes is None else max_bytes)
        written = []
        try:
            for batch in batches(conversations):
                written += self._import_batch(batch, owner)
        except BaseException as e:  # also a stop (Streamlit's StopException): all or nothing
            with self._lock, write_transaction(self.db):
                self._delete(written)
            if not isinstance(e, Exception):
                raise
            raise RuntimeError(f"the import failed while writing and was undone: {e}") from e
        return written

    def _import_batch(self, batch: list[Conversation], owner: str) -> list[str]:
        ids = []
        with self._lock, write_transaction(self.db):
            for conv, messages in batch:
                cid = conv["id"]
                if self.db["conversations"].count_where("id = ?", [cid]):
                    cid = uuid.uuid4().hex
                self.db["conversations"].insert({**conv, "id": cid, "owner": owner})
                self.db["messages"].insert_all({**m, "conversation_id": cid} for m in messages)
                ids.append(cid)
        return ids

    def export_markdown(self, owner: str, conversation_ids: list[str] | None = None) -> str:
        conversations = self.export_conversations(owner, conversation_ids)["conversations"]
        return "\n\n---\n\n".join(markdown(conv) for conv in conversations) + "\n"

    # benchmark runs

    def create_bench_run(self, machine: dict, settings: dict) -> int:
        with self._lock:
            return self.db["bench_runs"].insert(
                {"status": "running", "machine": machine, "settings": settings, "created_at": now()}).last_pk

    def add_bench_result(self, run_id: int, result: dict) -> int:
        """`result` is one bench JSON object: its headline numbers become columns, all of it is kept."""
        record = {key: result.get(key) for key in BENCH_COLUMNS}
        with self._lock:
            return self.db["bench_results"].insert(
                {**record, "run_id": run_id, "result": result, "created_at": now()}).last_pk

    def finish_bench_run(self, run_id: int, status: str = "done"):
        if status not in BENCH_STATUSES:
            raise ValueError(f"status must be one of {BENCH_STATUSES}, got {status!r}")
        with self._lock:
            self.db["bench_runs"].update(run_id, {"status": status, "finished_at": now()})

    def list_bench_runs(self) -> list[dict]:
        """Newest first, each with `n_results`."""
        with self._lock:
            rows = list(self.db.query("select r.*, (select count(*) from bench_results where run_id = r.id) as n_results"
                                      " from bench_runs r order by r.id desc"))
        return [decode_json(row, "machine", "settings") for row in rows]

    def bench_results(self, run_id: int) -> list[dict]:
        with self._lock:
            rows = list(self.db["bench_results"].rows_where("run_id = ?", [run_id], order_by="id"))
        return [decode_json(row, "result") for row in rows]


class ReplyWriter:
    """One assistant reply saved while it streams. `append` text deltas as they come: the text
    reaches the database every `flush_deltas` deltas, and at the latest `flush_seconds` after a
    delta arrived (a timer covers a stream that stalls), so a killed server loses at most the
    last second. `finish` finalises. As a context manager it finalises a reply left unfinished:
    "error" on an exception, "stopped" on a BaseException such as Streamlit's stop/rerun
    (a Stop click or a closed tab), "stop" if the block simply ends."""

    def __init__(self, store: Store, message_id: int, flush_seconds: float = 1.0, flush_deltas: int = 32):
        self.store, self.message_id = store, message_id
        self.flush_seconds, self.flush_deltas = flush_seconds, flush_deltas
        self.parts: list[str] = []
        self.unsaved = 0
        self.last_flush = time.monotonic()
        self.timer: threading.Timer | None = None
        self.finished = False
        self._lock = threading.Lock()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def append(self, delta: str):
        with self._lock:
            if self.finished:
                raise RuntimeError(f"reply {self.message_id} is already finished")
            self.parts.append(delta)
            self.unsaved += 1
            waited = time.monotonic() - self.last_flush
            if self.unsaved >= self.flush_deltas or waited >= self.flush_seconds:
                self._flush()
            elif self.timer is None:
                self.timer = threading.Timer(self.flush_seconds - waited, self._flush_due)
                self.timer.daemon = True
                self.timer.start()

    def flush(self):
        """Save the text received so far now."""
        with self._lock:
            if self.unsaved:
                self._flush()

    def _flush_due(self):
        with self._lock:
            if self.timer is threading.current_thread():  # not cancelled by a flush meanwhile
                self._flush()

    def _flush(self, final: dict | None = None):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.store._save_reply(self.message_id, self.text, final)
        self.unsaved = 0
        self.last_flush = time.monotonic()

    def finish(self, finish_reason: str = "stop", stats: dict | None = None, error: str | None = None,
               content: str | None = None):
        """Save the whole reply with why it ended (stop, length, stopped, error) and its stats
        (e.g. glm_core's ReplyStats.to_dict(): prompt_tokens, new_tokens, ttft_s, decode_tok_s, ...);
        `content` replaces the streamed text when the final reply differs (a model's clean-up)."""
        final = message_fields(finish_reason, stats, error)
        with self._lock:
            if self.finished:
                raise RuntimeError(f"reply {self.message_id} is already finished")
            self.finished = True
            if content is not None:
                self.parts = [content]
            self._flush(final)

    def __enter__(self) -> "ReplyWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.finished:
            if exc_type is None:
                self.finish("stop")
            elif issubclass(exc_type, Exception):
                self.finish("error", error=f"{exc_type.__name__}: {exc}")
            else:
                self.finish("stopped")
        return False


def markdown(conv: dict) -> str:
    lines = [f"# {conv['title'] or 'Untitled conversation'}", "",
             f"- model: {conv['model'] or '?'} ({conv['precision'] or '?'})", f"- started: {conv['created_at']}"]
    if conv["system_prompt"]:
        lines.append(f"- system prompt: {conv['system_prompt']}")
    for m in conv["messages"]:
        lines += ["", f"## {m['role'].capitalize()}", "", m["content"]]
        facts = [f"{m['new_tokens']} tokens" if m["new_tokens"] is not None else "",
                 f"{m['decode_tok_s']:.1f} tok/s" if m["decode_tok_s"] is not None else "",
                 f"first token {m['ttft_s']:.2f} s" if m["ttft_s"] is not None else "",
                 {"length": "cut at max length", "stopped": "stopped by user", "error": f"error: {m['error']}"}
                 .get(m["finish_reason"], "") if m["role"] == "assistant" else "",
                 "unfinished" if m["role"] == "assistant" and m["finish_reason"] is None else ""]
        if any(facts):
            lines += ["", "*" + " · ".join(f for f in facts if f) + "*"]
    return "\n".join(lines)
