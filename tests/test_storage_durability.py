"""storage/ under stress: replies saved while they stream, a server killed mid-reply, many threads."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import EVERYONE, NotOwnerError, Store

REPO = Path(__file__).resolve().parents[1]


def saved_content(path, message_id):
    """What another process would read from the file now."""
    with sqlite3.connect(path) as conn:
        return conn.execute("select content from messages where id = ?", [message_id]).fetchone()[0]


def test_a_reply_reaches_the_file_every_n_deltas_and_within_the_interval(tmp_path):
    path = tmp_path / "glm-studio.db"
    store = Store(path)
    cid = store.create_conversation("alice", "streaming")
    reply = store.begin_reply(cid, "alice", flush_seconds=60, flush_deltas=4)
    for delta in ["one ", "two ", "three "]:
        reply.append(delta)
    assert saved_content(path, reply.message_id) == ""
    reply.append("four ")
    assert saved_content(path, reply.message_id) == "one two three four "

    stalled = store.begin_reply(cid, "alice", flush_seconds=0.3, flush_deltas=1000)
    stalled.append("a token, then the model stalls")
    assert saved_content(path, stalled.message_id) == ""
    time.sleep(0.8)  # no further delta arrives: the timer saves it
    assert saved_content(path, stalled.message_id) == "a token, then the model stalls"
    stalled.append(" and resumes")
    stalled.finish("stop", {"new_tokens": 2})
    (last,) = [m for m in store.messages(cid, "alice") if m["id"] == stalled.message_id]
    assert (last["content"], last["finish_reason"], last["new_tokens"]) == \
        ("a token, then the model stalls and resumes", "stop", 2)
    assert reply.finished is False
    store.close()  # saves what the unfinished reply has; it stays unfinished
    assert saved_content(path, reply.message_id) == "one two three four "


class ScriptStopped(BaseException):
    """Like Streamlit's StopException/RerunException: what a Stop click or a closed tab raises."""


def test_a_reply_is_finalised_however_its_block_ends():
    store = Store()
    cid = store.create_conversation("alice", "endings")
    with store.begin_reply(cid, "alice") as plain:
        plain.append("all of it")
    with pytest.raises(ValueError), store.begin_reply(cid, "alice") as failed:
        failed.append("half of")
        raise ValueError("tokenizer exploded")
    with pytest.raises(ScriptStopped), store.begin_reply(cid, "alice") as stopped:
        stopped.append("the user ")
        stopped.append("left")
        raise ScriptStopped()
    with store.begin_reply(cid, "alice") as explicit:
        explicit.append("long answer")
        explicit.finish("length", {"new_tokens": 1, "decode_tok_s": 4.5})
    rows = [(m["content"], m["finish_reason"], m["error"], m["decode_tok_s"]) for m in store.messages(cid, "alice")]
    assert rows == [("all of it", "stop", None, None), ("half of", "error", "ValueError: tokenizer exploded", None),
                    ("the user left", "stopped", None, None), ("long answer", "length", None, 4.5)]
    with pytest.raises(RuntimeError, match="already finished"):
        explicit.append("more")
    with pytest.raises(RuntimeError, match="already finished"):
        explicit.finish("stop")


def test_a_reply_to_a_deleted_conversation_is_not_resurrected():
    store = Store()
    cid = store.create_conversation("alice", "short-lived")
    reply = store.begin_reply(cid, "alice", flush_deltas=1)
    reply.append("first")
    store.delete_conversation(cid, "alice")
    reply.append(" second")
    reply.finish("stop")
    with pytest.raises(NotOwnerError):
        store.get_conversation(cid, "alice")
    assert store.db["messages"].count == 0 and store.db["conversations"].count == 0


def test_eight_threads_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "glm-studio.db"
    stores = [Store(path), Store(path)]  # two connections to one file, as two server processes
    n_threads, n_chats, n_deltas = 8, 15, 12
    errors = []

    def visitor(worker):
        store, owner = stores[worker % 2], f"visitor-{worker}"
        try:
            for chat in range(n_chats):
                cid = store.create_conversation(owner, f"chat {chat}", "chatglm3-6b", "int8", "", {"chat": chat})
                store.add_message(cid, owner, "user", f"question {worker}/{chat}")
                with store.begin_reply(cid, owner, flush_deltas=3) as reply:
                    for d in range(n_deltas):
                        reply.append(f"w{worker}c{chat}d{d} ")
                    reply.finish("stop", {"new_tokens": n_deltas})
                store.rename_conversation(cid, owner, f"chat {chat} of {owner}")
                store.search(owner, f"w{worker}c{chat}d0")
                if chat % 5 == 4:
                    store.delete_conversation(cid, owner)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=visitor, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)

    check = Store(path)
    assert len(check.list_conversations(EVERYONE)) == n_threads * (n_chats - n_chats // 5)
    for worker in range(n_threads):
        owner = f"visitor-{worker}"
        kept = sorted((c["params"]["chat"], c["title"]) for c in check.list_conversations(owner))
        assert kept == [(c, f"chat {c} of {owner}") for c in range(n_chats) if c % 5 != 4]
        for conv in check.list_conversations(owner):
            chat = conv["params"]["chat"]
            messages = check.messages(conv["id"], owner)
            assert [(m["role"], m["content"], m["finish_reason"]) for m in messages] == [
                ("user", f"question {worker}/{chat}", None),
                ("assistant", "".join(f"w{worker}c{chat}d{d} " for d in range(n_deltas)), "stop")]
        assert len(check.search(owner, f"w{worker}c0d5")) == 1
    assert check.db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


STREAMER = """
import sys, time
from storage import open_store
reply = open_store(sys.argv[1]).begin_reply(sys.argv[2], "alice")
print("ready", reply.message_id, flush=True)
for i in range(100_000):
    reply.append(f"{i:05d} ")
    print(i, time.time(), flush=True)
    time.sleep(0.05)
"""


def test_a_server_killed_mid_reply_loses_at_most_the_last_second(tmp_path):
    path = tmp_path / "glm-studio.db"
    store = Store(path)
    cid = store.create_conversation("alice", "killed")
    store.add_message(cid, "alice", "user", "count for me")
    store.close()

    child = subprocess.Popen([sys.executable, "-c", STREAMER, str(path), cid], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        ready = child.stdout.readline().split()
        assert ready[0] == "ready", ready
        time.sleep(2.5)
    finally:
        os.kill(child.pid, signal.SIGKILL)
    killed_at = time.time()
    output, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    appended_at = [float(line.split()[1]) for line in output.splitlines()]
    assert len(appended_at) >= 20  # it really streamed for a while (20 deltas a second)

    store = Store(path)
    assert store.recovered_from is None
    (question, reply) = store.messages(cid, "alice")
    assert reply["id"] == int(ready[1]) and reply["finish_reason"] is None
    n_saved = len(reply["content"]) // 6
    assert reply["content"] == "".join(f"{i:05d} " for i in range(n_saved))  # a clean prefix
    # Every delta older than the flush interval (1 s, plus slack for a busy machine) is in the file.
    must_have = sum(t < killed_at - 1.5 for t in appended_at)
    assert must_have >= 10 and n_saved >= must_have
    assert [h["message_id"] for h in store.search("alice", "00003")] == [reply["id"]]
