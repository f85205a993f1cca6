"""storage/: schema migrations, conversations, search, export/import, deletion, damaged files."""

import hashlib
import json
import sqlite3

import pytest
from sqlite_utils import Database

from storage import EVERYONE, InvalidImport, NewerSchemaError, NotOwnerError, Store, default_db_path, open_store
from storage.schema import MIGRATIONS, SCHEMA_VERSION, migrations


def file_bytes(path):
    return b"".join(p.read_bytes() for p in [path, path.with_name(path.name + "-wal")] if p.exists())


def index_bytes(store):
    """The raw blocks of the full-text index, where deleted text lingers until the index is merged."""
    return b"".join(row[0] for row in store.db.execute("select block from messages_fts_data"))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fill(store, owner="alice"):
    """Two conversations with every kind of message field filled in."""
    first = store.create_conversation(owner, "Capital cities", "chatglm3-6b", "int4", "You are terse.",
                                      {"temperature": 0.8, "top_p": 0.7, "stop": ["\n\n"], "nested": {"a": [1, 2.5]}})
    store.add_message(first, owner, "user", "What is the capital of France?")
    store.add_message(first, owner, "assistant", "Paris.", "stop",
                      {"prompt_tokens": 12, "new_tokens": 3, "ttft_s": 0.125, "decode_tok_s": 2.75, "reused_tokens": 4})
    store.add_message(first, owner, "user", "我在北京工作，北京是首都吗？")
    with store.begin_reply(first, owner) as reply:
        reply.append("是的，")
        reply.append("北京是中国的首都。")
        reply.finish("length", {"prompt_tokens": 40, "new_tokens": 9, "ttft_s": 1.5, "prefill_tok_s": 26.0})
    second = store.create_conversation(owner, "Broken", "chatglm2-6b", "bf16", "", {})
    store.add_message(second, owner, "user", "Tell me a story")
    store.add_message(second, owner, "assistant", "Once upon a", "error", {"new_tokens": 3},
                      error="RuntimeError: out of memory")
    store.add_message(second, owner, "user", "Again")
    unfinished = store.begin_reply(second, owner)  # never finished: as after a killed server
    unfinished.append("Once")
    unfinished.flush()
    return first, second


# migrations

@pytest.mark.parametrize("applied", range(SCHEMA_VERSION))
def test_an_older_database_is_upgraded_with_its_data(applied):
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    db = Database(conn)
    migrations.apply(db, stop_before=MIGRATIONS[applied].__name__)
    assert [m.name for m in migrations.applied(db)] == [m.__name__ for m in MIGRATIONS[:applied]]
    if applied >= 1:  # written by the version that had only the first migrations
        db["conversations"].insert({"id": "old", "owner": "alice", "title": "from before", "model": "m",
                                    "precision": "fp32", "system_prompt": "", "params": "{}",
                                    "created_at": "2024-01-01T00:00:00.000+00:00",
                                    "updated_at": "2024-01-01T00:00:00.000+00:00"})
        db["messages"].insert({"conversation_id": "old", "role": "user", "content": "an older question",
                               "created_at": "2024-01-01T00:00:00.000+00:00",
                               "updated_at": "2024-01-01T00:00:00.000+00:00"})

    store = Store(conn)
    assert [m.name for m in migrations.applied(store.db)] == [m.__name__ for m in MIGRATIONS]
    assert not migrations.pending(store.db)
    if applied >= 1:
        assert store.get_conversation("old", "alice")["title"] == "from before"
        assert [h["conversation_id"] for h in store.search("alice", "older question")] == ["old"]
    run = store.create_bench_run({"cpu": "test"}, {"new_tokens": 8})
    assert store.list_bench_runs()[0]["id"] == run
    fill(store)
    Store(conn)  # opening an up-to-date database again changes nothing and does not fail
    assert [m.name for m in migrations.applied(store.db)] == [m.__name__ for m in MIGRATIONS]


def test_a_newer_database_is_refused_and_left_untouched():
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    store = Store(conn)
    fill(store)
    store.db["_sqlite_migrations"].insert({"migration_set": "glm_studio", "name": "m999_from_the_future",
                                           "applied_at": "2099-01-01"})
    schema, dump = store.db.schema, list(conn.iterdump())
    with pytest.raises(NewerSchemaError, match="newer version.*m999_from_the_future.*left untouched"):
        Store(conn)
    assert store.db.schema == schema and list(conn.iterdump()) == dump


def test_a_newer_database_file_keeps_every_byte(tmp_path):
    path = tmp_path / "history.db"
    store = Store(path)
    fill(store)
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("insert into _sqlite_migrations (migration_set, name, applied_at) "
                     "values ('glm_studio', 'm999_from_the_future', '2099')")
    conn.close()
    before = sha(path)
    with pytest.raises(NewerSchemaError, match=str(path)):
        open_store(path)
    assert sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name) == []


# damaged files

def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path):
    path = tmp_path / "glm-studio.db"
    garbage = b"these bytes are no SQLite database " * 200
    path.write_bytes(garbage)
    store = Store(path)
    assert store.recovered_from is not None and store.recovered_from.parent == tmp_path
    assert store.recovered_from.name.startswith("glm-studio.db.corrupt-")
    assert store.recovered_from.read_bytes() == garbage
    cid = store.create_conversation("alice", "fresh start")
    store.close()
    again = Store(path)
    assert again.recovered_from is None
    assert [c["id"] for c in again.list_conversations("alice")] == [cid]


def test_a_damaged_database_is_moved_aside_with_its_wal(tmp_path):
    path = tmp_path / "glm-studio.db"
    store = Store(path)
    for i in range(40):
        cid = store.create_conversation("alice", f"chat {i}")
        store.add_message(cid, "alice", "user", f"question {i} " * 200)
    store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 20 * 4096
    data[4096 * 3: 4096 * 12] = b"\xa5" * (4096 * 9)  # pages in the middle, header intact
    path.write_bytes(bytes(data))
    wal = tmp_path / "glm-studio.db-wal"
    wal.write_bytes(b"")
    store = Store(path)
    assert store.recovered_from is not None
    assert store.recovered_from.read_bytes() == bytes(data)
    assert (tmp_path / (store.recovered_from.name + "-wal")).exists()
    assert store.list_conversations(EVERYONE) == []


def test_recoveries_in_the_same_second_overwrite_nothing(tmp_path):
    path = tmp_path / "glm-studio.db"
    moved, damaged = [], [f"damaged file number {i} ".encode() * 100 for i in range(3)]
    for garbage in damaged:
        path.write_bytes(garbage)
        store = Store(path)
        moved.append(store.recovered_from)
        store.close()
        path.unlink()
    assert len(set(moved)) == 3
    assert [p.read_bytes() for p in moved] == damaged


# conversations and messages

def test_conversations_belong_to_their_owner():
    store = Store()
    alice_chats = fill(store, "alice")
    bob_chat = store.create_conversation("bob", "Bob's", "m", "fp32", "", {})
    store.add_message(bob_chat, "bob", "user", "capital of Spain?")
    assert {c["id"] for c in store.list_conversations("alice")} == set(alice_chats)
    assert [c["id"] for c in store.list_conversations("bob")] == [bob_chat]
    assert {c["id"] for c in store.list_conversations(EVERYONE)} == {*alice_chats, bob_chat}  # the operator
    assert [h["conversation_id"] for h in store.search("bob", "capital")] == [bob_chat]
    assert {h["conversation_id"] for h in store.search(EVERYONE, "capital")} == {alice_chats[0], bob_chat}
    assert [c["id"] for c in store.export_conversations("bob", [bob_chat])["conversations"]] == [bob_chat]
    assert (store.conversation_owner(bob_chat), store.conversation_owner("nope")) == ("bob", None)


def test_most_recently_updated_first_within_one_clock_tick(monkeypatch):
    """Updates faster than the clock moves (seen on a fast CPU) still list the last one updated first."""
    import storage.store as store_module
    from datetime import datetime as real_datetime, timezone

    class FrozenClock(real_datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=timezone.utc)

    monkeypatch.setattr(store_module, "datetime", FrozenClock)
    store = Store()
    chats = [store.create_conversation("alice", f"chat {i}", "m", "fp32", "", {}) for i in range(3)]
    store.rename_conversation(chats[0], "alice", "renamed")
    store.add_message(chats[1], "alice", "user", "hello")
    assert [c["id"] for c in store.list_conversations("alice")] == [chats[1], chats[0], chats[2]]


def test_conversation_fields_and_message_stats():
    store = Store()
    first, second = fill(store)
    conv = store.get_conversation(first, "alice")
    assert conv["params"]["nested"] == {"a": [1, 2.5]} and conv["system_prompt"] == "You are terse."
    store.rename_conversation(first, "alice", "Capitals")
    store.update_conversation(first, "alice", model="chatglm2-6b", params={"temperature": 0.1})
    conv = store.get_conversation(first, "alice")
    assert (conv["title"], conv["model"], conv["params"]) == ("Capitals", "chatglm2-6b", {"temperature": 0.1})
    assert store.list_conversations("alice")[0]["id"] == first  # most recently updated first
    with pytest.raises(TypeError, match="unknown conversation fields"):
        store.update_conversation(first, "alice", id="another")
    with pytest.raises(NotOwnerError):
        store.get_conversation("nope", "alice")

    messages = store.messages(first, "alice")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["decode_tok_s"] == 2.75 and messages[1]["stats"]["reused_tokens"] == 4
    assert (messages[3]["content"], messages[3]["finish_reason"], messages[3]["new_tokens"]) == \
        ("是的，北京是中国的首都。", "length", 9)
    broken = store.messages(second, "alice")
    assert (broken[1]["finish_reason"], broken[1]["error"]) == ("error", "RuntimeError: out of memory")
    assert (broken[3]["content"], broken[3]["finish_reason"]) == ("Once", None)
    with pytest.raises(ValueError, match="finish_reason"):
        store.add_message(first, "alice", "assistant", "x", "done")
    with pytest.raises(ValueError, match="role"):
        store.add_message(first, "alice", "robot", "x")


def test_delete_messages_from_drops_the_turn_and_what_follows():
    store = Store()
    first, second = fill(store)
    ids = [m["id"] for m in store.messages(first, "alice")]
    assert store.delete_messages_from(first, "alice", ids[3]) == 1  # regenerate the last reply
    assert [m["id"] for m in store.messages(first, "alice")] == ids[:3]
    assert store.delete_messages_from(first, "alice", ids[2]) == 1  # edit the last question
    assert store.delete_messages_from(second, "alice", ids[0]) == 0  # not a message of that conversation
    assert store.delete_messages_from(first, "alice", ids[0]) == 2
    assert store.messages(first, "alice") == [] and len(store.messages(second, "alice")) == 4
    assert store.delete_messages_from(first, "alice", 10_000) == 0


def test_search_finds_words_in_any_language_and_case():
    store = Store()
    first, second = fill(store)
    question = store.messages(first, "alice")[0]["id"]
    assert {h["message_id"] for h in store.search("alice", "CAPITAL france")} == {question}
    hits = store.search("alice", "北京")  # two characters: shorter than a trigram
    assert [h["role"] for h in hits] == ["assistant", "user"]
    assert all("北京" in h["snippet"] for h in hits)
    assert [h["title"] for h in store.search("alice", "首都吗")] == ["Capital cities"]
    assert store.search("alice", 'story" OR "x') == []  # FTS syntax in the query is taken literally
    assert [h["conversation_id"] for h in store.search("alice", '"story"')] == [second]
    assert store.search("alice", "50%") == [] and store.search("alice", "   ") == []
    long_id = store.add_message(second, "alice", "user", "word " * 200 + "needle in the haystack " + "word " * 200)
    (hit,) = store.search("alice", "needle")
    assert hit["message_id"] == long_id and "needle" in hit["snippet"] and len(hit["snippet"]) < 130


# export / import

def test_export_import_round_trip_is_exact():
    source = Store()
    fill(source, "alice")
    fill(source, "bob")
    exported = source.export_conversations("alice")
    text = json.dumps(exported, ensure_ascii=False, indent=2)
    assert len(exported["conversations"]) == 2

    target = Store()
    ids = target.import_conversations(text, owner="carol")
    assert ids == [c["id"] for c in exported["conversations"]]
    again = target.export_conversations("carol")
    assert again == exported
    assert json.dumps(again, ensure_ascii=False, indent=2) == text
    assert target.export_markdown("carol") == source.export_markdown("alice")

    copies = source.import_conversations(exported, owner="alice")  # ids taken: imported as copies
    assert set(copies).isdisjoint(ids) and len(source.list_conversations("alice")) == 4
    exported_copies = source.export_conversations("alice", copies)["conversations"]
    assert [{**c, "id": None} for c in exported_copies] == [{**c, "id": None} for c in exported["conversations"]]


def test_a_bad_import_writes_nothing():
    store = Store()
    fill(store)
    good = store.export_conversations("alice")
    broken = json.loads(json.dumps(good))
    broken["conversations"][0]["id"] = "new-id"
    del broken["conversations"][1]["messages"][0]["role"]
    target = Store()
    with pytest.raises(InvalidImport, match="^conversation 2, message 1: missing role$"):
        target.import_conversations(broken, owner="carol")
    with pytest.raises(InvalidImport, match="not a GLM Studio"):
        target.import_conversations({"conversations": []}, owner="carol")
    with pytest.raises(InvalidImport, match="version"):
        target.import_conversations({**good, "version": 99}, owner="carol")
    assert target.list_conversations(EVERYONE) == [] and target.search(EVERYONE, "capital") == []


def test_markdown_export_reads_like_the_chat():
    store = Store()
    first, second = fill(store)
    md = store.export_markdown("alice", [first])
    assert md.startswith("# Capital cities\n")
    assert "## User\n\nWhat is the capital of France?" in md and "## Assistant\n\nParis." in md
    assert "3 tokens · 2.8 tok/s · first token 0.12 s" in md and "cut at max length" in md
    assert "Broken" not in md
    everything = store.export_markdown(EVERYONE)
    assert "error: RuntimeError: out of memory" in everything and "unfinished" in everything
    assert everything.count("\n---\n") == 1


# deletion

def test_delete_really_deletes_rows_index_and_bytes(tmp_path):
    path = tmp_path / "glm-studio.db"
    store = Store(path)
    first, second = fill(store)
    secret = "zanzibarquokka" * 3
    store.add_message(first, "alice", "user", f"my secret is {secret}, in rare characters 龘靐齉爩, keep it")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert secret.encode() in file_bytes(path)
    # The index keeps trigrams; the tail of one made of characters used nowhere else is findable.
    assert "靐齉".encode() in index_bytes(store) and "齉爩".encode() in index_bytes(store)
    assert len(store.search("alice", secret)) == 1

    store.delete_conversation(first, "alice")
    with pytest.raises(NotOwnerError):
        store.get_conversation(first, "alice")
    assert store.db["messages"].count_where("conversation_id = ?", [first]) == 0
    assert store.search(EVERYONE, secret) == [] and store.search(EVERYONE, "capital") == []
    assert store.db.execute("select count(*) from messages_fts where messages_fts match ?",
                            ['"zanzibar"']).fetchone()[0] == 0
    assert secret.encode() not in file_bytes(path) and "龘靐齉爩".encode() not in file_bytes(path)
    assert "靐齉".encode() not in index_bytes(store) and "齉爩".encode() not in index_bytes(store)
    assert "Paris".encode() not in file_bytes(path)
    assert [h["conversation_id"] for h in store.search("alice", "story")] == [second]  # index intact
    with pytest.raises(NotOwnerError):
        store.delete_conversation(first, "alice")


# benchmark runs

def test_benchmark_runs_keep_numbers_and_whole_results():
    store = Store()
    run = store.create_bench_run({"cpu": "EPYC", "cores": 2}, {"new_tokens": 128, "prompts": [32, 512]})
    result = {"model": "chatglm2-6b", "precision": "int4", "prompt_tokens": 512, "new_tokens": 128,
              "load_s": 12.5, "peak_rss_gb": 3.4, "prefill_tok_s": 25.0, "decode_tok_s": 3.9, "ttft_s": 20.1,
              "top1_agreement": 0.97, "mean_kl": 0.012, "perplexity": 7.25, "notes": {"threads": 2}}
    store.add_bench_result(run, result)
    store.add_bench_result(run, {"precision": "bf16", "decode_tok_s": 1.1})
    (listed,) = store.list_bench_runs()
    assert (listed["status"], listed["finished_at"], listed["n_results"]) == ("running", None, 2)
    assert listed["machine"] == {"cpu": "EPYC", "cores": 2}
    store.finish_bench_run(run, "done")
    assert store.list_bench_runs()[0]["status"] == "done" and store.list_bench_runs()[0]["finished_at"]
    rows = store.bench_results(run)
    assert rows[0]["result"] == result and rows[0]["mean_kl"] == 0.012 and rows[0]["perplexity"] == 7.25
    assert (rows[1]["precision"], rows[1]["load_s"], rows[1]["result"]) == ("bf16", None, {"precision": "bf16", "decode_tok_s": 1.1})
    with pytest.raises(ValueError, match="status"):
        store.finish_bench_run(run, "finished")


def test_the_database_path_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("GLM_STUDIO_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "glm-studio" / "glm-studio.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "glm-studio" / "glm-studio.db"
    monkeypatch.setenv("GLM_STUDIO_DB", str(tmp_path / "deep" / "dir" / "mine.db"))
    store = open_store()
    assert store.path == tmp_path / "deep" / "dir" / "mine.db" and store.path.exists()
    assert store.db.journal_mode == "wal"
