"""Native ChatGLM2/3 against the goldens of the official code (fp32), plus the KV cache contract."""
import json

import numpy as np
import pytest
import torch

import glm_core.model as model_module
from glm_core.checkpoint import load_model
from glm_core.config import load_config
from glm_core.kvcache import ContextOverflowError
from glm_core.model import rotary
from glm_core import native, quant
from conftest import FIXTURES
from quant_sweep import error_bound

pytestmark = pytest.mark.usefixtures("one_thread")

VERSIONS = ["v2", "v3"]
SEQUENCES = ["s1_len5", "s2_len40", "s3_len200", "s4_chat_layout"]


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """The gate of the brief: max |diff| <= 1e-4 * max |ref| (logits here reach about 60)."""
    ref = torch.as_tensor(ref, dtype=torch.float32).reshape(out.shape)
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4 * ref.abs().max().item(), f"max |diff| {diff:.3g}, max |ref| {ref.abs().max():.3g}"


@pytest.fixture(scope="module", params=VERSIONS)
def case(request):
    ver = request.param
    golden = json.loads((FIXTURES / "golden" / f"{ver}_model.json").read_text(encoding="utf-8"))
    arrays = np.load(FIXTURES / "golden" / f"{ver}_logits.npz")
    return load_model(FIXTURES / ver, "fp32"), golden, arrays


@pytest.mark.parametrize("seq", SEQUENCES)
def test_logits_match_official(case, seq):
    model, golden, arrays = case
    assert_close(model.logits(golden["sequences"][seq]), arrays[f"logits_{seq}"][0])


def test_kv_cache_step(case):
    model, golden, arrays = case
    kv = golden["kv_cache"]
    model.reset_cache()
    assert_close(model.prefill(kv["prefill_ids"]), arrays["kv_prefill_logits"][0, -1])
    step = model.decode_one_token(kv["next_token"])
    assert_close(step, arrays["kv_step_logits"][0, 0])
    assert_close(step, arrays["kv_full_logits_last"][0, 0])
    assert_close(step, model.logits(kv["prefill_ids"] + [kv["next_token"]])[-1])
    assert model.cached_ids == kv["prefill_ids"] + [kv["next_token"]]


@pytest.fixture
def cache_runs(case, monkeypatch):
    """(number of ids, start position) of every forward that writes the KV cache."""
    model, runs, hidden = case[0], [], case[0].hidden

    def counted_hidden(segments):
        runs.extend((len(ids), len(cache.ids)) for cache, ids in segments if cache is model.cache)
        return hidden(segments)

    monkeypatch.setattr(model, "hidden", counted_hidden)
    return runs


def test_prefill_reuses_cached_prefix(case, cache_runs):
    model, golden, arrays = case
    ids = golden["sequences"]["s3_len200"]
    fresh = model.logits(ids)[-1]
    model.reset_cache()
    model.prefill(ids[:120])
    assert_close(model.prefill(ids), fresh)
    assert cache_runs == [(120, 0), (80, 120)]
    # a prompt that leaves the cached ids at 150 overwrites the stale tail
    other = ids[:150] + ids[20:60]
    assert_close(model.prefill(other), model.logits(other)[-1])
    assert cache_runs[-1] == (40, 150)
    # the same ids again still run the last one: its logits are the answer
    assert_close(model.prefill(other), model.logits(other)[-1])
    assert cache_runs[-1] == (1, 189) and model.cached_ids == other


def test_long_prompt_runs_in_chunks(case, cache_runs, monkeypatch):
    model, golden, arrays = case
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 64)
    model.reset_cache()
    assert_close(model.prefill(golden["sequences"]["s3_len200"]), arrays["logits_s3_len200"][0, -1])
    assert cache_runs == [(64, 0), (64, 64), (64, 128), (8, 192)]
    assert model.cached_ids == golden["sequences"]["s3_len200"]
    step = model.decode_one_token(7)
    assert_close(step, model.logits(golden["sequences"]["s3_len200"] + [7])[-1])


def test_greedy_chat_ids(case):
    model, golden, _ = case
    for chat in golden["chat_greedy"]:
        model.reset_cache()
        logits = model.prefill(chat["prompt_input_ids"])
        generated = []
        while len(generated) < len(chat["generated_ids"]):
            generated.append(int(logits.argmax()))
            logits = model.decode_one_token(generated[-1])
        assert generated == chat["generated_ids"], chat["name"]


def test_cache_grows_in_chunks_and_overflows(case):
    model, golden, _ = case
    seq_length = model.config.seq_length     # 512 in the fixtures
    ids = (golden["sequences"]["s3_len200"] * 3)[:seq_length]
    model.reset_cache()
    assert model.cache is None
    model.prefill(ids[:10])
    assert model.cache.capacity == 256
    model.prefill(ids[:300])
    assert model.cache.capacity == 512
    model.prefill(ids[:-1])
    model.decode_one_token(ids[-1])
    assert model.cache.capacity == seq_length and len(model.cached_ids) == seq_length
    with pytest.raises(ContextOverflowError):
        model.decode_one_token(ids[0])
    with pytest.raises(ContextOverflowError):
        model.prefill(ids + ids[:1])
    with pytest.raises(ContextOverflowError):
        model.logits(ids + ids[:1])
    model.reset_cache()
    assert model.cache is None and model.cached_ids == []


@pytest.mark.parametrize("ver", VERSIONS)
def test_bf16_close_to_fp32(ver):
    """Measured on s3 (200 tokens): max |diff| 0.13 and mean |diff| 0.013 logit std (std about 11.5)."""
    golden = json.loads((FIXTURES / "golden" / f"{ver}_model.json").read_text(encoding="utf-8"))
    ref = torch.from_numpy(np.load(FIXTURES / "golden" / f"{ver}_logits.npz")["logits_s3_len200"][0])
    model = load_model(FIXTURES / ver, "bf16")
    assert model.transformer.output_layer.weight.dtype == torch.bfloat16
    out = model.logits(golden["sequences"]["s3_len200"])
    diff = (out - ref).abs() / ref.std()
    assert diff.max() < 0.2 and diff.mean() < 0.02
    model.reset_cache()
    ids = golden["sequences"]["s3_len200"]
    assert (model.prefill(ids[:-8]) - ref[-9]).abs().max() / ref.std() < 0.2
    for i in range(-8, 0):   # decode steps: one row a product (on AVX2 CPUs native's bf16 kernel)
        assert (model.decode_one_token(ids[i]).float() - ref[i]).abs().max() / ref.std() < 0.2


@pytest.mark.parametrize("onednn", [True, False])
def test_half_prefill_products_upcast_in_slices_where_half_gemms_are_slow(onednn, monkeypatch):
    """On a CPU without native bf16 a bf16 linear given several rows multiplies fp32 copies of its weight, a slice at a
    time, through oneDNN or MKL (quant.matmul_fp32): the fp32 product within its accumulation error, then the output
    rounded to bf16 once."""
    monkeypatch.setattr(model_module, "slow_half_gemm", lambda dtype: True)
    monkeypatch.setattr(native, "takes_bf16", lambda x, weight: False)   # else 7 rows take the AVX2 kernel
    monkeypatch.setattr(quant, "onednn_for_fp32_linears", lambda: onednn)
    monkeypatch.setattr(model_module, "UPCAST_ELEMENTS", 32 * 256)   # slices of 32 rows: 3 whole, one of 4
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(256, 100).bfloat16()
    x = torch.randn(7, 256, generator=g).bfloat16()
    out = model_module.linear(layer, x)
    xd, w = x.double(), layer.weight.double()
    ref = xd.mm(w.t()) + layer.bias.double()
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).abs() <= error_bound(xd, w, torch.float32) + 2.0 ** -8 * ref.abs()).all()


def test_long_context_rotary_per_version():
    """ChatGLM2-32k interpolates positions (p / rope_ratio); ChatGLM3-32k raises the base (10000 * rope_ratio)."""
    v2 = load_config(FIXTURES / "v2")
    v3 = load_config(FIXTURES / "v3")
    plain_cos, plain_sin = rotary(v2, torch.arange(0, 64), torch.float32)
    v2.rope_ratio = 16.0
    cos, sin = rotary(v2, torch.arange(0, 64 * 16), torch.float32)
    assert torch.allclose(cos[::16], plain_cos, atol=1e-5) and torch.allclose(sin[::16], plain_sin, atol=1e-5)
    v3.rope_ratio = 50.0
    cos, _ = rotary(v3, torch.arange(1, 2), torch.float32)
    dim = v3.head_dim // 2
    expected = torch.cos(1.0 / 500000.0 ** (torch.arange(0, dim, 2).float() / dim))
    assert torch.allclose(cos.flatten(), expected, atol=1e-6)


def test_a_step_at_a_tensor_position_equals_the_eager_step(case):
    """decode_at (what a CUDA graph captures) on a full-length cache gives the eager step's logits."""
    model, golden, _ = case
    ids = golden["sequences"]["s2_len40"]
    eager, fixed = model.new_cache(), model.new_cache()
    model.prepare(eager, ids)
    model.prepare(fixed, ids)
    model.forward([(eager, ids)])
    model.forward([(fixed, ids)])
    fixed.reserve_full()
    token = 7
    for _ in range(3):
        expected = model.forward([(eager, [token])])[0]
        got = model.decode_at(fixed, torch.tensor([token]), torch.tensor([len(fixed.ids)]))[0]
        fixed.ids.append(token)
        assert_close(got, expected)
        token = int(expected.argmax())
