"""Chat prompt ids and reply clean-up against what the official chat() did in the goldens."""
import json

import pytest

from glm_core.templates import clean_response, prompt_ids, round_prompt
from glm_core.tokenizer import load_tokenizer
from conftest import FIXTURES

MODELS = [("v1", 1), ("v2", 2), ("v3", 3), ("v2_int8", 2), ("v2_int4", 2)]
TOKENIZERS = {name: load_tokenizer(FIXTURES / name, version) for name, version in MODELS}


def golden(name: str) -> dict:
    return json.loads((FIXTURES / "golden" / f"{name}.json").read_text(encoding="utf-8"))


def chats(name: str) -> list[dict]:
    model = golden(f"{name}_model")
    return model.get("chat_greedy") or model["chat_greedy_codeB"]


def as_messages(version: int, history: list, query: str, role: str = "user") -> list[dict]:
    """Official chat() arguments as role messages: v1/v2 history is (query, reply) pairs, v3 already dicts."""
    if version == 3:
        return history + [{"role": role, "content": query}]
    pairs = [[{"role": "user", "content": q}, {"role": "assistant", "content": r}] for q, r in history]
    return [m for pair in pairs for m in pair] + [{"role": role, "content": query}]


CHATS = [(name, version, i) for name, version in MODELS for i in range(3)]


@pytest.mark.parametrize("name,version,index", CHATS)
def test_prompt_ids_equal_official_chat(name, version, index):
    chat = chats(name)[index]
    messages = as_messages(version, chat["history_in"], chat["query"])
    assert prompt_ids(TOKENIZERS[name], version, messages) == chat["prompt_input_ids"]


@pytest.mark.parametrize("name,version,index", CHATS)
def test_clean_response_equals_official_reply(name, version, index):
    chat = chats(name)[index]
    ids = chat["generated_ids"]
    reply_ids = ids[:-1] if version == 3 else ids  # v3 chat() always drops the last generated token
    assert clean_response(version, TOKENIZERS[name].decode(reply_ids)) == chat["response"]


def test_v2_build_prompt_two_round_history():
    case = golden("v2_tokenizer")["build_prompt_two_round_history"]
    history = [tuple(pair) for pair in case["history"]]
    assert round_prompt(2, case["query"], history) == case["prompt"]
    assert prompt_ids(TOKENIZERS["v2"], 2, as_messages(2, case["history"], case["query"])) == case["input_ids"]


@pytest.mark.parametrize("key", ["build_chat_input_system_plus_two_rounds", "build_chat_input_observation_role"])
def test_v3_build_chat_input(key):
    case = golden("v3_tokenizer")[key]
    messages = as_messages(3, case["history"], case["query"], case["role"])
    assert prompt_ids(TOKENIZERS["v3"], 3, messages) == case["input_ids"]


@pytest.mark.parametrize("name,version", [("v1", 1), ("v2", 2)])
def test_v1_v2_system_prompt_goes_before_the_first_query(name, version):
    tok = TOKENIZERS[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "嗯"}, {"role": "user", "content": "再见"}]
    expected = tok.encode(round_prompt(version, "再见", [("Be brief.\n\n你好", "嗯")]), add_special_tokens=True)
    assert prompt_ids(tok, version, messages) == expected


def test_v3_tools_are_folded_into_the_system_message():
    tok = TOKENIZERS["v3"]
    tools = [{"name": "天气", "parameters": {"city": "string"}}]
    with_tools = [{"role": "system", "content": "Use tools.", "tools": tools}, {"role": "user", "content": "hi"}]
    folded = [{"role": "system", "content": "Use tools.\n" + json.dumps(tools, indent=4, ensure_ascii=False)},
              {"role": "user", "content": "hi"}]
    assert prompt_ids(tok, 3, with_tools) == prompt_ids(tok, 3, folded)
    assert tok.sp_encode(json.dumps(tools, indent=4, ensure_ascii=False)) != tok.sp_encode("")


def test_v3_assistant_metadata_is_encoded():
    tok = TOKENIZERS["v3"]
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    tagged = [dict(m) for m in plain]
    tagged[1]["metadata"] = "weather"
    assert prompt_ids(tok, 3, tagged) != prompt_ids(tok, 3, plain)
    ids, meta = prompt_ids(tok, 3, tagged), tok.sp_encode("weather\n")
    start = ids.index(tok.special_ids["<|assistant|>"]) + 1
    assert ids[start:start + len(meta)] == meta


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "tool", "content": "a"}],
])
def test_bad_conversations_are_refused(messages):
    with pytest.raises(ValueError):
        prompt_ids(TOKENIZERS["v3"], 3, messages)


def test_v1_v2_refuse_observation_and_broken_turn_order():
    with pytest.raises(ValueError, match="alternate"):
        prompt_ids(TOKENIZERS["v2"], 2, [{"role": "observation", "content": "{}"}])
    with pytest.raises(ValueError, match="alternate"):
        prompt_ids(TOKENIZERS["v1"], 1, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_clean_response_rules():
    assert clean_response(1, "  你好,世界!好:的;吗?  [[训练时间]] ok, fine ") == "你好，世界！好：的；吗？  2023年 ok, fine"
    assert clean_response(2, " 你好,世界 [[训练时间]]\n") == "你好,世界 2023年"
    assert clean_response(3, "\n 你好 [[训练时间]] ") == "你好 2023年"
    tool_call = "get_weather\n```python\ntool_call(city='北京')\n```"
    assert clean_response(3, tool_call) == tool_call
