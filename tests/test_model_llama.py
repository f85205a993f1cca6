"""model_llama: transformers' Llama-family models on the native blocks compute what transformers computes."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from glm_core import native
from glm_core.batch import NativeBatcher
from glm_core.model_llama import Llama, from_transformers, layer_table
from glm_core.quant import GGUFLinear, keep_gguf_tables
from conftest import needs_native_library

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
IDS = [5, 17, 99, 3, 64, 21, 8, 120, 77, 42, 9, 1, 33, 58, 101, 12, 90, 7, 66, 30]

SUPPORTED = {
    "llama, tied, llama3 rope": LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama, yarn rope (attention scaling)": LlamaConfig(**SHAPE, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2, q/k/v biases": Qwen2Config(**SHAPE),
    "mistral, no sliding window": MistralConfig(**SHAPE, sliding_window=None),
}
UNSUPPORTED = {
    "qwen3: query and key norms": (Qwen3Config(**SHAPE), "model_type 'qwen3'"),
    "mistral with a sliding window": (MistralConfig(**SHAPE, sliding_window=8), "sliding window"),
    "llama, dynamic rope": (LlamaConfig(**SHAPE, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                  "factor": 2.0}), "rope"),
    "llama, biased output projection": (LlamaConfig(**SHAPE, attention_bias=True), "biases"),
    "llama, biased MLP": (LlamaConfig(**SHAPE, mlp_bias=True), "biases"),
    "llama, gelu": (LlamaConfig(**SHAPE, hidden_act="gelu"), "activation"),
}


def random_model(config, dtype=torch.float32):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    with torch.no_grad():   # biases and norms away from their initial zeros and ones, so a misplaced one shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SUPPORTED)
def test_the_blocks_compute_what_transformers_computes(case, dtype):
    hf = random_model(SUPPORTED[case], dtype)
    with torch.inference_mode():
        reference = hf(input_ids=torch.tensor([IDS])).logits[0].float()
    tied = hf.lm_head.weight is hf.model.embed_tokens.weight
    model = from_transformers(hf)
    assert isinstance(model, Llama) and model.dtype == dtype
    assert not any(p.is_meta for p in [*model.parameters(), *model.buffers()])
    head, table = model.transformer.output_layer.weight, model.transformer.embedding.word_embeddings.weight
    assert (head is table) == tied
    # the same operations on the same roundings; only a fused product's sums may be ordered otherwise by the GEMM
    scale = reference.abs().max()
    tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * scale
    torch.testing.assert_close(model.logits(IDS), reference, rtol=0, atol=tolerance)
    # a prompt in two chunks, then decode steps one id at a time, as the batcher runs them
    batcher = NativeBatcher(model)
    seq = batcher.open(IDS[:12])
    steps = [batcher.step(seq, [])[seq]]
    for token in IDS[12:]:
        steps.append(batcher.step(None, [(seq, token)])[seq])
    torch.testing.assert_close(torch.stack(steps), reference[11:], rtol=0, atol=tolerance)


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_what_the_blocks_do_not_compute_stays_with_transformers(case, caplog):
    config, reason = UNSUPPORTED[case]
    hf = random_model(config)
    layers = list(hf.model.layers)
    with caplog.at_level("INFO", logger="glm_core.model_llama"):
        assert from_transformers(hf) is None
    assert reason in caplog.text
    assert list(hf.model.layers) == layers   # nothing taken from it


def on_q4_1_grid(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a GGUF Q4_1 tensor holds it (gguf-py's quantizer, dequantized as transformers does on load)."""
    from gguf import GGMLQuantizationType, quants
    kind = GGMLQuantizationType.Q4_1
    return torch.from_numpy(quants.dequantize(quants.quantize(weight.numpy(), kind), kind).copy())


def gguf_model(config) -> Llama:
    """A random model of this config on the blocks, its products GGUF Q4_1 tensors as the embedded model's are."""
    hf = random_model(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(on_q4_1_grid(p))
    model = from_transformers(hf)
    keep_gguf_tables(model)
    assert all(isinstance(getattr(block.mlp, name), GGUFLinear) for block in model.transformer.encoder.layers
               for name in ("dense_h_to_4h", "dense_4h_to_h"))
    return model


@needs_native_library
@pytest.mark.parametrize("case", ["llama, tied, llama3 rope", "qwen2, q/k/v biases"])
def test_decode_steps_of_gguf_weights_run_the_layers_in_one_native_call(case, monkeypatch):
    """A model whose products are all GGUF block tensors (the embedded model in fp32) decodes through
    native.llama_decode_layers, every layer in one call: the logits its blocks compute in torch, for two sequences of
    other lengths stepped together, within fp32's rounding (the norms sum their squares in another order, SiLU's exp
    is within 2 ulp). Prompts still run on the blocks."""
    model = gguf_model(SUPPORTED[case])
    calls = []
    decode_layers = native.llama_decode_layers
    monkeypatch.setattr(native, "llama_decode_layers", lambda x, *args: calls.append(len(x)) or decode_layers(x, *args))

    def steps() -> torch.Tensor:
        batcher = NativeBatcher(model)
        first, second = batcher.open(IDS[:12]), batcher.open(IDS[:5])
        tokens = {first: IDS[12], second: IDS[5]}
        batcher.step(first, []), batcher.step(second, [])
        out = []
        for i in range(6):
            logits = batcher.step(None, list(tokens.items()))
            out.append(torch.stack([logits[first], logits[second]]))
            tokens = {first: IDS[13 + i], second: IDS[6 + i]}
        return torch.stack(out)

    fused = steps()
    assert calls == [2] * 6
    model.native_layers = (None,)   # no table: the blocks run in torch
    reference = steps()
    assert calls == [2] * 6
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


@needs_native_library
def test_heads_the_native_attention_does_not_take_keep_the_blocks_in_torch():
    """Heads of 4 dims (decode_attention takes multiples of 8): no table, decode steps on the blocks in torch, which
    compute what transformers computes."""
    config = LlamaConfig(**{**SHAPE, "num_attention_heads": 16, "num_key_value_heads": 4})
    model = gguf_model(config)
    assert model.transformer.encoder.layers[0].self_attention.head_dim == 4
    assert layer_table(model.transformer.encoder.layers) is None
    batcher = NativeBatcher(model)
    seq = batcher.open(IDS[:12])
    steps = [batcher.step(seq, [])[seq]] + [batcher.step(None, [(seq, token)])[seq] for token in IDS[12:]]
    reference = model.logits(IDS)[11:]
    torch.testing.assert_close(torch.stack(steps), reference, rtol=0, atol=1e-5 * reference.abs().max().item())
