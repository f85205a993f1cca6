"""Official-layout INT8/INT4 checkpoints with odd layer widths: the fast path stays within the documented tolerance
of exact=True at every row count, and nothing crashes. Widths 200 and 100 are not multiples of 16 (the bf16 int8
kernel's block) nor of 32 (int4 groups): the layers the kernels cannot take as they are must be routed, not run."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import glm_core
from conftest import FIXTURES
from glm_core.checkpoint import build_model
from glm_core.config import load_config
from glm_core.quant import dense_min_rows

ODD = {"hidden_size": 200, "num_attention_heads": 5, "kv_channels": 40, "multi_query_group_num": 1,
       "ffn_hidden_size": 100, "num_layers": 2}
BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
ROWS = (1, 2, 3, 5, 8, 17, 64, dense_min_rows() - 1, dense_min_rows(), dense_min_rows() + 1, 200)


def official_quantized(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official recipe (fixtures README §4): fp16 scale = max|w| / (2^(b-1)-1) per row, q = round(w / scale);
    int4 packed two to a byte, high nibble first."""
    scale = (weight.float().abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half()
    q = torch.round(weight.float() / scale.float()[:, None]).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
    return q, scale


def write_checkpoint(target, bits: int):
    """A 2-layer ChatGLM2 of odd widths, random fp16 weights, as stored officially (bits 0: fp16)."""
    target.mkdir()
    raw = json.loads((FIXTURES / "v2" / "config.json").read_text())
    raw.update(ODD)
    if bits:
        raw["quantization_bit"] = bits
    (target / "config.json").write_text(json.dumps(raw))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "v2" / name, target / name)
    g = torch.Generator().manual_seed(bits)
    tensors = {}
    for name, param in build_model(load_config(target), torch.float16).named_parameters():
        if name.endswith("layernorm.weight"):
            value = 1 + 0.2 * torch.randn(param.shape, generator=g)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(param.shape, generator=g)
        else:
            value = torch.randn(param.shape, generator=g) / (param.shape[-1] ** 0.5 if param.dim() == 2 and
                                                             "embedding" not in name else 1)
        value = value.half()
        module = name.rpartition(".")[0]
        if bits and name.endswith(".weight") and module.endswith(BLOCK_LINEARS):
            tensors[name], tensors[module + ".weight_scale"] = official_quantized(value, bits)
        else:
            tensors[name] = value
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return {bits: write_checkpoint(root / f"int{bits}", bits) for bits in (0, 8, 4)}


@pytest.mark.parametrize("bits, precision", [(8, "int8"), (4, "int4"), (0, "int8"), (0, "int4")])
def test_odd_widths_fast_path_is_within_tolerance_of_exact_at_every_row_count(checkpoints, bits, precision):
    path = str(checkpoints[bits])
    fast = glm_core.load(path, precision=precision)
    exact = glm_core.load(path, precision=precision, exact=True)
    layer = fast.model.transformer.encoder.layers[0]
    assert layer.self_attention.query_key_value.in_features == 200 and layer.mlp.dense_4h_to_h.in_features == 100
    g = torch.Generator().manual_seed(7)
    prompt = fast.prompt_ids([{"role": "user", "content": "hello"}])
    for rows in ROWS:
        ids = (prompt + torch.randint(3, 1500, (rows,), generator=g).tolist())[:rows]
        ref, got = exact.logits(ids), fast.logits(ids)
        assert torch.isfinite(got).all(), rows
        # the documented tolerance of the fast path (README; test_engine_glm): bf16-rounded product inputs
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max(), (rows, float((got - ref).abs().max() / ref.abs().max()))
        assert (got - ref).abs().mean() <= 0.02 * ref.std(), rows
    # decode (one row at a time through the KV cache) agrees with the exact model's greedy ids to the first split
    ids = fast.prompt_ids([{"role": "user", "content": "你好"}])
    assert len(fast.generate_ids(ids, max_new_tokens=8)) >= 1
    step = fast.model.prefill(ids)
    torch.testing.assert_close(step, fast.logits(ids)[-1], atol=0.03 * float(step.abs().max()), rtol=0)
