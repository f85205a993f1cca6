"""The public API of DESIGN.md on the native ChatGLM engines, against the official goldens."""
import ast
import io
import re
import json
import threading

import numpy as np
import pytest
import torch

import glm_core
from conftest import FIXTURES

GOLDEN = FIXTURES / "golden"
CASES = {"v1": "fp32", "v2": "fp32", "v3": "fp32", "v2_int8": "int8", "v2_int4": "int4"}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    # pre-quantized checkpoints: exact, the official CPU arithmetic the goldens ran (the fast path is checked below)
    engine = glm_core.load(str(FIXTURES / name), precision=CASES[name], device="cpu", exact=True)
    golden = json.loads((GOLDEN / f"{name}_model.json").read_text())
    return name, engine, golden


def lit(value):
    return ast.literal_eval(value) if isinstance(value, str) else value


def chats(golden: dict) -> list[dict]:
    return golden.get("chat_greedy") or golden["chat_greedy_codeB"]


def messages_of(name: str, chat: dict) -> list[dict]:
    history = lit(chat["history_in"])
    messages = []
    for turn in history:
        if isinstance(turn, dict):
            messages.append({k: v for k, v in turn.items() if k in ("role", "content", "tools", "metadata")})
        else:
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return messages + [{"role": "user", "content": chat["query"]}]


def test_prompt_ids_and_greedy_chat_ids_equal_the_official_chat(case):
    name, engine, golden = case
    for chat in chats(golden):
        ids = engine.prompt_ids(messages_of(name, chat))
        assert ids == lit(chat["prompt_input_ids"]), chat["name"]
        assert engine.generate_ids(ids, max_new_tokens=32) == lit(chat["generated_ids"]), chat["name"]


def test_logits_of_every_golden_sequence(case):
    name, engine, golden = case
    z = np.load(GOLDEN / f"{name}_logits.npz")
    for seq, ids in golden["sequences"].items():
        ref = torch.from_numpy(z[f"logits_{seq}"][0])
        got = engine.logits(ids)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        scale = ref.abs().max()
        # The fixtures' gate; pre-quantized checkpoints run exact here (see the fixture).
        assert (got - ref).abs().max() <= 1e-4 * scale, (seq, float((got - ref).abs().max() / scale))


@pytest.mark.parametrize("name", ["v2_int8", "v2_int4"])
def test_prequantized_default_is_the_fast_path_close_to_the_official(name):
    engine = glm_core.load(str(FIXTURES / name), precision=CASES[name], device="cpu")
    assert engine.model.transformer.encoder.layers[0].mlp.dense_h_to_4h.activation_dtype == torch.bfloat16
    golden = json.loads((GOLDEN / f"{name}_model.json").read_text())
    z = np.load(GOLDEN / f"{name}_logits.npz")
    for seq, ids in golden["sequences"].items():
        ref, got = torch.from_numpy(z[f"logits_{seq}"][0]), engine.logits(ids)
        # bf16-rounded inputs to the quantized products; measured: max 1.7 %, mean |diff| / std under 0.01
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max(), seq
        assert (got - ref).abs().mean() <= 0.02 * ref.std(), seq
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99, seq


def test_stream_chat_streams_text_and_stops(case):
    name, engine, golden = case
    question = [{"role": "user", "content": "你好"}]
    params = glm_core.GenerationParams(max_new_tokens=20, do_sample=False)
    whole = glm_core.ReplyStats()
    assert "".join(engine.stream_chat(question, params, None, whole)) and whole.new_tokens == 20  # runs past 6 alone
    stop, stats, stopped_at = threading.Event(), glm_core.ReplyStats(), None
    for _ in engine.stream_chat(question, params, stop, stats):
        if stats.new_tokens >= 6 and stopped_at is None:
            stop.set()
            stopped_at = stats.new_tokens
    assert stats.finish_reason == "stopped" and stats.new_tokens == stopped_at and stats.prompt_tokens > 0


def test_tokenizer_is_exposed(case):
    name, engine, golden = case
    assert engine.decode(engine.tokenizer.encode("hello world")).strip() == "hello world"


def test_precision_defaults_to_what_the_checkpoint_can_give():
    from glm_core.registry import default_precision
    assert default_precision(glm_core.EMBEDDED) == "fp32"
    assert default_precision("chatglm2-6b") == "bf16" and default_precision("chatglm2-6b-int4") == "int4"
    assert default_precision(str(FIXTURES / "v2_int8")) == "int8" and default_precision(str(FIXTURES / "v3")) == "bf16"


def test_terminal_chat_loads_a_prequantized_checkpoint_as_stored(monkeypatch, capsys):
    from glm_core.__main__ import main
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nstop\n"))
    assert main(["chat", str(FIXTURES / "v2_int4"), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "(int4, cpu)" in err and re.search(r"\[[1-4] tokens", err)
