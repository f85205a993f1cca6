"""ChatGLMv1 against the goldens of the official ChatGLM-6B code (fixtures/golden/v1_*)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from glm_core.checkpoint import load_model
from glm_core.config import load_config
from glm_core.kvcache import ContextOverflowError
from glm_core.model_v1 import ChatGLMv1, attention_mask, context_layout, position_ids
from conftest import FIXTURES

GOLDEN = json.loads((FIXTURES / "golden" / "v1_model.json").read_text(encoding="utf-8"))
SEQUENCES = GOLDEN["sequences"]
MASK, GMASK, SOP = 1056, 1057, 1060   # fixture ids of [MASK], [gMASK], <sop>
# bf16 vs the fp32 goldens, measured: max |diff| 0.48 = 1.8% of max |logit| (s3), mean |diff| 0.057.
BF16_MAX_REL = 0.03
BF16_MEAN_ABS = 0.1


@pytest.fixture(scope="module")
def golden_logits():
    with np.load(FIXTURES / "golden" / "v1_logits.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "v1", precision="fp32")


@pytest.fixture
def fresh(model):
    model.reset_cache()
    yield model
    model.reset_cache()


def assert_close(out, ref):
    out, ref = np.asarray(out, dtype=np.float32), np.asarray(ref, dtype=np.float32)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def greedy(model, prompt, n):
    logits = model.prefill(prompt)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.decode_one_token(out[-1])
    return out


@pytest.mark.parametrize("name", list(GOLDEN["v1_position_ids_and_masks"]))
def test_positions_and_mask_match_official(name):
    ids, ref = SEQUENCES[name], GOLDEN["v1_position_ids_and_masks"][name]
    config = load_config(FIXTURES / "v1")
    context_length, mask_position = context_layout(ids, config)
    assert context_length == ref["context_length"]
    pos, block = position_ids(0, len(ids), context_length, mask_position)
    assert [pos.tolist(), block.tolist()] == ref["position_ids"]
    if ref["attention_mask_true_means_masked"] is not None:
        masked = ~attention_mask(0, len(ids), context_length)
        assert masked.int().tolist() == ref["attention_mask_true_means_masked"]


def test_mask_token_rules(model):
    config = model.config
    # [MASK] only: positions after <sop> sit on it.
    ids = [5, 125, MASK, 276, SOP, 7]
    assert context_layout(ids, config) == (4, 2)
    pos, block = position_ids(0, len(ids), 4, 2)
    assert pos.tolist() == [0, 1, 2, 3, 2, 2] and block.tolist() == [0, 0, 0, 0, 1, 2]
    # Both: the official model prefers [gMASK]; the first <sop> ends the context.
    assert context_layout([MASK, 5, GMASK, SOP, 9, SOP], config) == (3, 2)
    with pytest.raises(ValueError, match="<sop>"):
        model.logits([5, 125, GMASK])
    with pytest.raises(ValueError, match="MASK"):
        model.logits([5, 125, SOP])


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_logits_match_golden(model, golden_logits, name):
    out = model.logits(SEQUENCES[name])
    assert out.dtype == torch.float32 and out.shape == (len(SEQUENCES[name]), model.config.vocab_size)
    assert_close(out, golden_logits[f"logits_{name}"][0])


def test_kv_step_matches_golden(fresh, golden_logits):
    kv = GOLDEN["kv_cache"]
    assert_close(fresh.prefill(kv["prefill_ids"]), golden_logits["kv_prefill_logits"][0, -1])
    step = fresh.decode_one_token(kv["next_token"])
    assert_close(step, golden_logits["kv_step_logits"][0, 0])
    assert_close(step, golden_logits["kv_full_logits_last"][0, 0])
    assert fresh.cached_ids == kv["prefill_ids"] + [kv["next_token"]]


@pytest.mark.parametrize("case", GOLDEN["chat_greedy"], ids=lambda c: c["name"])
def test_greedy_chat_reproduces_official_ids(fresh, case):
    assert greedy(fresh, case["prompt_input_ids"], len(case["generated_ids"])) == case["generated_ids"]


def test_cache_grows_past_a_chunk_and_matches_full_forward(fresh):
    prompt = SEQUENCES["s3_len200"]
    new = greedy(fresh, prompt, 60)                # 260 positions: the cache grows past its first 256
    assert fresh.cache.capacity <= fresh.config.seq_length
    fresh.reset_cache()
    steps = [fresh.prefill(prompt)] + [fresh.decode_one_token(t) for t in new[:-1]]
    full = fresh.logits(prompt + new[:-1])
    assert_close(torch.stack(steps), full[len(prompt) - 1:])


def test_prefill_reuses_cache_only_where_exact(fresh, monkeypatch):
    runs = []
    hidden = fresh.hidden

    def spy(segments):
        runs.extend((len(cache.ids), len(ids)) for cache, ids in segments if cache is fresh.cache)
        return hidden(segments)

    monkeypatch.setattr(fresh, "hidden", spy)
    s2, s3 = SEQUENCES["s2_len40"], SEQUENCES["s3_len200"]
    full = fresh.logits(s2)
    runs.clear()
    fresh.prefill(s2[:35])
    # Same context and <sop>: only the new ids run.
    assert_close(fresh.prefill(s2), full[-1])
    # The same ids again (regenerate): only the last id reruns.
    assert_close(fresh.prefill(s2), full[-1])
    # Back to the prompt that ends at <sop>: every context K/V is kept.
    assert_close(fresh.prefill(s2[:32]), full[31])
    assert runs == [(0, 35), (35, 5), (39, 1), (31, 1)]
    # Another context sharing 29 or 30 ids: the context is bidirectional, so every K/V changes and all reruns.
    same_length = s2[:29] + [7, GMASK, SOP]
    longer = s3[:60] + [GMASK, SOP]
    assert s2[29] != 7 and s2[:30] == longer[:30]
    for other in (same_length, longer, s2):
        runs.clear()
        assert_close(fresh.prefill(other), fresh.logits(other)[-1])
        assert runs[0] == (0, len(other))


def test_context_overflow(model):
    small = ChatGLMv1(dataclasses.replace(model.config, seq_length=40))
    small.load_state_dict(model.state_dict())
    ids = SEQUENCES["s2_len40"]
    small.prefill(ids)
    with pytest.raises(ContextOverflowError):
        small.decode_one_token(5)
    assert small.cache.capacity == 40
    with pytest.raises(ContextOverflowError):
        small.logits(ids + [5])
    with pytest.raises(ContextOverflowError):
        small.prefill(ids + [5])


def test_reset_cache_frees_it(fresh):
    fresh.prefill(SEQUENCES["s1_len5"])
    assert fresh.cache is not None and fresh.cached_ids == SEQUENCES["s1_len5"]
    fresh.reset_cache()
    assert fresh.cache is None and fresh.cached_ids == []
    with pytest.raises(RuntimeError):
        fresh.decode_one_token(5)


def test_module_tree_and_quantizable(model):
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    names = {name for name, _ in model.named_parameters()}
    assert "transformer.layers.0.attention.query_key_value.weight" in names
    assert len(model.quantizable) == 4 * model.config.num_layers
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in model.quantizable)


def test_bf16_stays_close_to_fp32(golden_logits):
    bf16 = load_model(FIXTURES / "v1", precision="bf16")
    assert bf16.dtype == torch.bfloat16
    for name, ids in SEQUENCES.items():
        out, ref = bf16.logits(ids).numpy(), golden_logits[f"logits_{name}"][0]
        diff = np.abs(out - ref)
        assert diff.max() <= BF16_MAX_REL * np.abs(ref).max(), name
        assert diff.mean() <= BF16_MEAN_ABS, name
