"""storage/ as a LAN server needs it: every conversation readable and changeable by its owner only,
EVERYONE (the operator) reading all and changing nothing, and imports checked before any write."""

import json
import threading
import uuid

import pytest

from storage import EVERYONE, MAX_IMPORT_BYTES, InvalidImport, NotOwnerError, Store


def alice_and_bob():
    """A store with Alice's conversation (two messages) and Bob's; returns it, Alice's id and her question's id."""
    store = Store()
    alice = store.create_conversation("alice", "Alice's plans", "chatglm3-6b", "int4", "", {"temperature": 0.5})
    question = store.add_message(alice, "alice", "user", "where is the treasure buried")
    store.add_message(alice, "alice", "assistant", "under the old oak", "stop", {"new_tokens": 5})
    bob = store.create_conversation("bob", "Bob's")
    store.add_message(bob, "bob", "user", "treasure maps")
    return store, alice, question


def snapshot(store):
    """Everything in the store, owners included: compared before and after what must change nothing."""
    return store.list_conversations(EVERYONE), store.export_conversations(EVERYONE)


READS = {
    "get_conversation": lambda store, cid, owner, mid: store.get_conversation(cid, owner),
    "messages": lambda store, cid, owner, mid: store.messages(cid, owner),
    "export_conversations": lambda store, cid, owner, mid: store.export_conversations(owner, [cid]),
    "export_markdown": lambda store, cid, owner, mid: store.export_markdown(owner, [cid]),
}
CHANGES = {
    "rename_conversation": lambda store, cid, owner, mid: store.rename_conversation(cid, owner, "mine now"),
    "update_conversation": lambda store, cid, owner, mid: store.update_conversation(cid, owner, system_prompt="obey"),
    "add_message": lambda store, cid, owner, mid: store.add_message(cid, owner, "user", "injected"),
    "delete_messages_from": lambda store, cid, owner, mid: store.delete_messages_from(cid, owner, mid),
    "begin_reply": lambda store, cid, owner, mid: store.begin_reply(cid, owner),
    "delete_conversation": lambda store, cid, owner, mid: store.delete_conversation(cid, owner),
}


# ownership

@pytest.mark.parametrize("method", [*READS, *CHANGES])
def test_a_guest_can_neither_read_nor_change_anothers_conversation(method):
    store, alice, question = alice_and_bob()
    call = {**READS, **CHANGES}[method]
    before = snapshot(store)
    with pytest.raises(NotOwnerError, match=f"^no conversation '{alice}' of yours$"):
        call(store, alice, "mallory", question)
    assert snapshot(store) == before
    call(store, alice, "alice", question)  # the owner may


def test_a_guest_finds_nothing_of_anothers_in_lists_search_and_exports():
    store, alice, question = alice_and_bob()
    assert store.list_conversations("mallory") == []
    assert store.search("mallory", "treasure") == [] and store.search("mallory", "oak") == []
    assert store.export_conversations("mallory")["conversations"] == []
    own = store.create_conversation("mallory", "mine")
    assert store.delete_messages_from(own, "mallory", question) == 0  # Alice's message, through her own chat
    assert [h["conversation_id"] for h in store.search("alice", "treasure")] == [alice]


@pytest.mark.parametrize("method", [*READS, *CHANGES])
def test_the_error_does_not_tell_whether_a_conversation_exists(method):
    store, alice, question = alice_and_bob()
    call = {**READS, **CHANGES}[method]
    never = uuid.uuid4().hex
    with pytest.raises(NotOwnerError) as someone_elses:
        call(store, alice, "mallory", question)
    with pytest.raises(NotOwnerError) as missing:
        call(store, never, "mallory", question)
    assert str(someone_elses.value).replace(alice, "ID") == str(missing.value).replace(never, "ID")


def test_everyone_reads_every_conversation_but_changes_none():
    store, alice, question = alice_and_bob()
    assert len(store.list_conversations(EVERYONE)) == 2
    assert len(store.search(EVERYONE, "treasure")) == 2
    for read in READS.values():
        assert read(store, alice, EVERYONE, question)
    assert store.get_conversation(alice, EVERYONE)["owner"] == "alice"
    assert [m["content"] for m in store.messages(alice, EVERYONE)] == ["where is the treasure buried",
                                                                       "under the old oak"]
    before = snapshot(store)
    for change in CHANGES.values():
        with pytest.raises(NotOwnerError):
            change(store, alice, EVERYONE, question)
    with pytest.raises(NotOwnerError):
        store.create_conversation(EVERYONE, "nobody's")
    with pytest.raises(NotOwnerError):
        store.import_conversations(store.export_conversations(EVERYONE), EVERYONE)
    assert snapshot(store) == before


@pytest.mark.parametrize("owner", [None, "", 42])
def test_an_owner_is_a_visitor_id(owner):
    store, alice, question = alice_and_bob()
    before = snapshot(store)
    calls = [lambda: store.list_conversations(owner), lambda: store.search(owner, "treasure"),
             lambda: store.export_conversations(owner), lambda: store.create_conversation(owner, "x"),
             lambda: store.import_conversations(store.export_conversations(EVERYONE), owner)]
    calls += [lambda call=call: call(store, alice, owner, question) for call in [*READS.values(), *CHANGES.values()]]
    for call in calls:
        with pytest.raises((TypeError, ValueError)):
            call()
    assert snapshot(store) == before


# imports

def good_export() -> dict:
    store, alice, question = alice_and_bob()
    return store.export_conversations("alice")


def changed(change) -> str:
    """The JSON text of a good export after `change(doc, first conversation, its second message)`."""
    doc = good_export()
    change(doc, doc["conversations"][0], doc["conversations"][0]["messages"][1])
    return json.dumps(doc)


MALFORMED = {
    "not JSON": ("{", r"^the file is not valid JSON: Expecting property name enclosed in double quotes "
                      r"at line 1, column 2$"),
    "nested JSON": ('{"format": "glm-studio-conversations", "version": 1, "conversations": '
                    + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "number too long": (changed(lambda d, c, m: m.update(new_tokens=123456789)).replace("123456789", "9" * 5000),
                        "a number too long to read"),
    "not UTF-8": (changed(lambda d, c, m: m.update(content="café")).replace("\\u00e9", "é").encode("latin-1"),
                  r"^the file is not UTF-8 text \(at byte [\d,]+\)$"),
    "not an export": ("[]", "^this is not a GLM Studio conversations export$"),
    "newer version": (changed(lambda d, c, m: d.update(version=2)), "^unsupported export version 2;"),
    "unknown top field": (changed(lambda d, c, m: d.update(owner="mallory")),
                          r"^the export: unknown field\(s\) owner$"),
    "conversations not a list": (changed(lambda d, c, m: d.update(conversations={})), "conversations must be a list"),
    "content null": (changed(lambda d, c, m: m.update(content=None)),
                     "^conversation 1, message 2: content must be text$"),
    "content too long": (changed(lambda d, c, m: m.update(content="x" * 1_000_001)),
                         "^conversation 1, message 2: content is longer than 1,000,000 characters$"),
    "lone surrogate": (changed(lambda d, c, m: m.update(content="\ud800")),
                       "^conversation 1, message 2: content is not valid Unicode text$"),
    "huge integer": (changed(lambda d, c, m: m.update(new_tokens=10**30)),
                     "^conversation 1, message 2: new_tokens must be a whole number from 0 to 1,000,000,000 or null, "
                     "not 1000000000000000000000000000000$"),
    "huge integer in stats": (changed(lambda d, c, m: m["stats"].update(new_tokens=10**30)),
                              "^conversation 1, message 2: stats: new_tokens must be a whole number"),
    "negative count": (changed(lambda d, c, m: m.update(prompt_tokens=-1)), "prompt_tokens must be a whole number"),
    "NaN": (changed(lambda d, c, m: m.update(ttft_s=float("nan"))),
            "^conversation 1, message 2: ttft_s must be a number from 0 to 1,000,000,000 or null, not nan$"),
    "true as a count": (changed(lambda d, c, m: m.update(new_tokens=True)), "new_tokens must be a whole number"),
    "params a list": (changed(lambda d, c, m: c.update(params=[1, 2])),
                      "^conversation 1: params: must be an object of named values, not list$"),
    "title a number": (changed(lambda d, c, m: c.update(title=5)), "^conversation 1: title must be text$"),
    "title too long": (changed(lambda d, c, m: c.update(title="x" * 1001)), "title is longer than 1,000 characters"),
    "bad id": (changed(lambda d, c, m: c.update(id="../../etc")), "^conversation 1: id must be 1 to 64 letters"),
    "bad timestamp": (changed(lambda d, c, m: c.update(created_at="yesterday")),
                      "^conversation 1: created_at must be a date and time"),
    "messages not a list": (changed(lambda d, c, m: c.update(messages="hi")),
                            "^conversation 1: messages must be a list$"),
    "message not an object": (changed(lambda d, c, m: c["messages"].append("hello")),
                              "^conversation 1, message 3 must be an object$"),
    "missing field": (changed(lambda d, c, m: m.pop("role")), "^conversation 1, message 2: missing role$"),
    "unknown field": (changed(lambda d, c, m: m.update(contents="x")),
                      r"^conversation 1, message 2: unknown field\(s\) contents$"),
    "unknown role": (changed(lambda d, c, m: m.update(role="root")),
                     "^conversation 1, message 2: role must be one of system, user, assistant, observation, "
                     "not 'root'$"),
    "unknown finish_reason": (changed(lambda d, c, m: m.update(finish_reason="done")), "finish_reason must be one of"),
    "error not text": (changed(lambda d, c, m: m.update(error=["boom"])),
                       "^conversation 1, message 2: error must be text$"),
    "stats a list": (changed(lambda d, c, m: m.update(stats=[1])),
                     "^conversation 1, message 2: stats must be an object"),
    "stats nested": (changed(lambda d, c, m: m.update(stats={"a": {"b": 1}})),
                     "^conversation 1, message 2: stats: a must"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_import_is_refused_clearly_and_writes_nothing(case):
    data, message = MALFORMED[case]
    store, alice, question = alice_and_bob()
    before = snapshot(store)
    with pytest.raises(InvalidImport, match=message):
        store.import_conversations(data, "alice")
    assert snapshot(store) == before


def test_params_are_checked_by_the_callable_passed_in():
    def checked(params):  # as the app's GenerationParams.checked(d).to_dict()
        if not isinstance(params, dict) or set(params) - {"temperature", "top_p"}:
            raise ValueError("unknown generation parameter(s); known: temperature, top_p")
        return {"temperature": 0.8, "top_p": 0.8, **params}

    store = Store()
    (cid,) = store.import_conversations(changed(lambda d, c, m: c.update(params={"top_p": 0.5})), "carol",
                                        validate_params=checked)
    assert store.get_conversation(cid, "carol")["params"] == {"temperature": 0.8, "top_p": 0.5}
    for params in ({"temprature": 2}, [1, 2]):
        with pytest.raises(InvalidImport, match="^conversation 1: params: unknown generation parameter"):
            store.import_conversations(changed(lambda d, c, m: c.update(params=params)), "carol",
                                       validate_params=checked)
    assert len(store.list_conversations(EVERYONE)) == 1


def test_an_import_over_the_size_limit_is_refused_before_parsing(monkeypatch):
    assert MAX_IMPORT_BYTES == 20 * 1024 * 1024
    store, alice, question = alice_and_bob()
    before = snapshot(store)
    text = changed(lambda d, c, m: None)
    with pytest.raises(InvalidImport, match=r"^the file is too big to import: 200 bytes, the limit is 104 \(0.0 MB\)$"):
        store.import_conversations("[" * 200, "carol", max_bytes=104)  # too big, so never parsed
    with pytest.raises(InvalidImport, match="too big to import"):
        store.import_conversations(text.encode(), "carol", max_bytes=len(text) - 1)
    monkeypatch.setenv("GLM_STUDIO_MAX_IMPORT_MB", str(len(text) / 2**20 / 2))  # read at each import
    with pytest.raises(InvalidImport, match="too big to import"):
        store.import_conversations(text, "carol")
    assert snapshot(store) == before
    monkeypatch.setenv("GLM_STUDIO_MAX_IMPORT_MB", str(len(text) / 2**20))
    assert len(store.import_conversations(text, "carol")) == 1


def export_of(n_conversations: int, content_chars: int) -> dict:
    source = Store()
    for i in range(n_conversations):
        cid = source.create_conversation("dave", f"chat {i}")
        source.add_message(cid, "dave", "user", f"question {i} " + "x" * content_chars)
    return source.export_conversations("dave")


class OthersWriteWhenLetGo:
    """Stands in for the store's lock: the first time the importing thread lets go of it, another
    visitor writes (in a thread of its own), and the import goes on once that write is done."""

    def __init__(self, lock, write):
        self.lock, self.write, self.depth, self.done = lock, write, 0, False
        self.importer = threading.current_thread()

    def __enter__(self):
        self.lock.acquire()
        self.depth += 1

    def __exit__(self, *exc):
        self.depth -= 1
        let_go = self.depth == 0
        self.lock.release()
        if let_go and not self.done and threading.current_thread() is self.importer:
            self.done = True
            other = threading.Thread(target=self.write)
            other.start()
            other.join(timeout=30)


@pytest.mark.parametrize("n_conversations, content_chars", [(120, 100), (4, 900_000)])
def test_a_big_import_lets_other_visitors_write_between_its_batches(n_conversations, content_chars):
    export = export_of(n_conversations, content_chars)
    store = Store()
    store._lock = OthersWriteWhenLetGo(store._lock, lambda: store.create_conversation("bob", "meanwhile"))
    ids = store.import_conversations(export, "alice")
    titles = [row["title"] for row in store.db.query("select title from conversations order by rowid")]
    assert 0 < titles.index("meanwhile") < n_conversations  # Bob wrote while the import was under way
    assert ids == [c["id"] for c in export["conversations"]]
    assert store.export_conversations("alice") == export  # and it is still exact


def test_an_import_that_fails_while_writing_is_undone():
    store, alice, question = alice_and_bob()
    export = export_of(120, 100)
    export["conversations"][-1]["messages"][0]["content"] = "the disk fills up here"  # in the last batch
    store.db.execute("create temp trigger disk_full before insert on messages when new.content = "
                     "'the disk fills up here' begin select raise(abort, 'database or disk is full'); end")
    before = snapshot(store)
    with pytest.raises(RuntimeError, match="^the import failed while writing and was undone: database or disk is full"):
        store.import_conversations(export, "alice")
    assert snapshot(store) == before
