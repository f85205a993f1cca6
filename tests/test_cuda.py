"""The CUDA paths: the same goldens on a GPU. Runs where torch sees a CUDA device (CI has none)."""
import json

import numpy as np
import pytest
import torch

import glm_core
from conftest import FIXTURES
from glm_core import quant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it on a lent GPU machine)")
GOLDEN = FIXTURES / "golden"


@pytest.mark.parametrize("name", ["v1", "v2", "v3"])
def test_fp32_logits_and_greedy_ids_on_cuda(name):
    engine = glm_core.load(str(FIXTURES / name), precision="fp32", device="cuda")
    golden = json.loads((GOLDEN / f"{name}_model.json").read_text())
    z = np.load(GOLDEN / f"{name}_logits.npz")
    for seq, ids in golden["sequences"].items():
        ref = torch.from_numpy(z[f"logits_{seq}"][0])
        got = engine.logits(ids).cpu()
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), seq
    for chat in golden["chat_greedy"]:
        ids = chat["prompt_input_ids"]
        assert engine.generate_ids(ids, max_new_tokens=32) == chat["generated_ids"], chat["name"]


@pytest.mark.parametrize("name,precision", [("v2_int8", "int8"), ("v2_int4", "int4"), ("v2", "int8"), ("v2", "int4"),
                                            ("v2", "bf16"), ("v2", "fp16")])
def test_quantized_and_half_precisions_run_on_cuda_close_to_the_cpu(name, precision):
    gpu = glm_core.load(str(FIXTURES / name), precision=precision, device="cuda")
    ref = np.load(GOLDEN / f"{name}_logits.npz")["logits_s2_len40"][0]
    ids = json.loads((GOLDEN / f"{name}_model.json").read_text())["sequences"]["s2_len40"]
    got = gpu.logits(ids).cpu().numpy()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    bound = {"int8": 0.1, "int4": 0.5 if name == "v2" else 0.05, "bf16": 0.05, "fp16": 0.01}[precision]
    assert rel <= bound, rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (0.5 if precision == "int4" and name == "v2" else 0.9)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_linear_on_cuda_equals_the_same_quantization_on_cpu(precision):
    torch.manual_seed(0)
    w = torch.randn(512, 1024).to(torch.bfloat16)
    gpu = quant.quantize_linear(w.to("cuda"), None, precision)
    cpu = quant.quantize_linear(w, None, precision)      # same codes and scales; its weights can be read back
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    dense = x.float() @ cpu.dequantize(torch.float32).t()
    got = gpu(x.to("cuda")).float().cpu()
    assert torch.allclose(got, dense, rtol=2e-2, atol=2e-2 * dense.abs().max().item())


@pytest.mark.parametrize("name,precision", [("v2", "fp32"), ("v3", "bf16"), ("v2", "int4"), ("v2_int8", "int8"),
                                            ("embedded", "bf16")])
def test_cuda_graph_decode_equals_eager_decode(name, precision, monkeypatch):
    """Two sequences taking turns with the one graph (each taking its tensor in turn), against the same steps run
    eagerly. The embedded model: a Llama on the native blocks (model_llama)."""
    source = glm_core.EMBEDDED if name == "embedded" else str(FIXTURES / name)
    engine = glm_core.load(source, precision=precision, device="cuda")
    assert engine.batcher.graphed is not None
    prompts = [engine.prompt_ids([{"role": "user", "content": q}]) for q in ("你好", "晚上睡不着应该怎么办")]

    def run(batcher) -> list[list[torch.Tensor]]:
        seqs = [batcher.open(p) for p in prompts]
        out = []
        for seq in seqs:
            logits = None
            while logits is None:
                logits = batcher.step(seq, []).get(seq)
            out.append([logits])
        for _ in range(6):
            for seq, steps in zip(seqs, out):
                steps.append(batcher.step(None, [(seq, int(steps[-1].argmax()))])[seq])
        for seq in seqs:
            batcher.close(seq, keep=False)
        return out
    graphed = run(engine.batcher)
    assert engine.batcher.graphed.captures == 1
    eager = run(type(engine.batcher)(engine.model))
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for g_steps, e_steps in zip(graphed, eager):
        for g, e in zip(g_steps, e_steps):
            assert (g - e).abs().max() <= tolerance * e.abs().max()
