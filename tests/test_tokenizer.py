"""The native tokenizers against the goldens of the official ChatGLM tokenizers (v1, v2, v3)."""
import json

import pytest

from glm_core.tokenizer import IceTokenizer, load_tokenizer, split_added
from conftest import FIXTURES



def golden(name: str) -> dict:
    return json.loads((FIXTURES / "golden" / f"{name}.json").read_text(encoding="utf-8"))


TOKENIZERS = {v: load_tokenizer(FIXTURES / f"v{v}", v) for v in (1, 2, 3)}
GOLDEN = {v: golden(f"v{v}_tokenizer") for v in (1, 2, 3)}
CASES = [(v, i) for v in (1, 2, 3) for i in range(len(GOLDEN[v]["cases"]))]


@pytest.mark.parametrize("version,index", CASES)
def test_case_matches_official(version, index):
    tok, case = TOKENIZERS[version], GOLDEN[version]["cases"][index]
    text, plain_ids = case["text"], case["encode_add_special_tokens_false"]
    assert tok.tokenize(text) == case["tokenize"]
    assert tok.encode(text) == plain_ids
    assert tok.encode(text, add_special_tokens=True) == case["encode_default"] == case["call_input_ids"]
    assert tok.convert_ids_to_tokens(plain_ids) == case["convert_ids_to_tokens_nospecial"]
    assert tok.decode(plain_ids) == case["decode_nospecial_ids"]
    assert tok.decode(case["call_input_ids"]) == case["decode_call_ids"]
    assert tok.decode(case["call_input_ids"], skip_special_tokens=True) == case["decode_call_ids_skip_special"]
    assert (tok.decode(plain_ids) == text) == case["roundtrip_exact"]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_special_ids_follow_the_official_tables(version):
    tok, special = TOKENIZERS[version], GOLDEN[version]["special"]
    assert tok.version == version
    assert tok.vocab_size == GOLDEN[version]["vocab_size_property"]
    assert tok.eos_id == special["eos_token_id"]
    if version == 1:
        for piece, i in special["piece_ids"].items():
            if piece in tok.special_ids:
                assert tok.special_ids[piece] == i
        assert tok.special_ids["[gMASK]"] == special["gmask_token_id"]
        assert tok.stop_ids == [special["eos_token_id"]]  # <eop>
    else:
        commands = special["get_command"]
        for name, i in commands.items():
            if not name.startswith("<") or name.startswith("<|"):  # the appended specials
                assert tok.special_ids[name] == i
        assert tok.special_ids["<s>"] == commands["<bos>"] and tok.special_ids["</s>"] == commands["<eos>"]


def test_v1_image_token_offset_variant():
    variant = GOLDEN[1]["image_token_offset_variant"]
    tok = IceTokenizer(FIXTURES / "v1" / "ice_text.model", num_image_tokens=variant["num_image_tokens"])
    assert tok.vocab_size == variant["vocab_size_property"]
    assert tok.special_ids["[gMASK]"] == variant["gmask_token_id"]
    assert tok.special_ids["<sop>"] == variant["bos_token_id"]
    assert tok.eos_id == variant["eos_token_id"]
    for case in variant["cases"]:
        assert tok.encode(case["text"]) == case["encode_add_special_tokens_false"]
        assert tok.encode(case["text"], add_special_tokens=True) == case["call_input_ids"]
        assert tok.decode(case["call_input_ids"]) == case["decode"]
        assert tok.convert_ids_to_tokens([0, 1, 19999, 20000]) == case["tokens_of_ids_0_1_19999_20000"]


def test_v3_added_tokens_split_rendered_chat_template():
    case = GOLDEN[3]["apply_chat_template_(tokenizer_config_jinja)"]
    assert TOKENIZERS[3].encode(case["text"]) == case["input_ids"]


@pytest.mark.parametrize("name,version", [("v1", 1), ("v2", 2), ("v3", 3), ("v2_int8", 2), ("v2_int4", 2)])
def test_decode_generated_ids_and_stop_ids(name, version):
    tok = load_tokenizer(FIXTURES / name, version)
    model = golden(f"{name}_model")
    for chat in model.get("chat_greedy") or model["chat_greedy_codeB"]:
        assert tok.decode(chat["generated_ids"]) == chat["decode_generated_ids"]
        assert tok.stop_ids == chat["gen_kwargs_seen_by_generate"].get("eos_token_id", [tok.eos_id])
    config = json.loads((FIXTURES / name / "config.json").read_text(encoding="utf-8"))
    assert tok.eos_id == config["eos_token_id"]


def test_v3_stops_on_eos_user_and_observation():
    tok = TOKENIZERS[3]
    assert tok.stop_ids == [tok.eos_id, tok.special_ids["<|user|>"], tok.special_ids["<|observation|>"]]


def test_split_added_strips_as_configured():
    assert split_added("a <x> b", {"<x>": (True, True)}) == [("a", False), ("<x>", True), ("b", False)]
    assert split_added("a <x> b", {"<x>": (False, False)}) == [("a ", False), ("<x>", True), (" b", False)]
    assert split_added("<xy><x>", {"<x>": (False, False), "<xy>": (False, False)}) == [("<xy>", True), ("<x>", True)]


def test_v1_decode_cleans_up_spaces_like_transformers():
    tok = TOKENIZERS[1]
    assert tok.decode(tok.encode("Hi , you !")) == "Hi, you!"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path, 2)
