"""glm_core.bench: figures present and in the right units, quality against the highest precision, random
weights at true size (on tiny configs), the CLI's table and JSON, cancel. Correctness only, not speed."""
import json
import math
import threading
from types import SimpleNamespace
from contextlib import contextmanager

import psutil
import pytest
import torch

import glm_core
from glm_core import bench
from glm_core.checkpoint import build_model, load_model
from glm_core.config import load_config
from glm_core.engines import tensor_bytes
from conftest import FIXTURES

V2 = str(FIXTURES / "v2")


@pytest.fixture(scope="module")
def fixture_run():
    """fp32 and int8 of the tiny v2 checkpoint, prompts 16 and 8, 4 new tokens (given out of order on purpose)."""
    events, turns = [], []

    @contextmanager
    def turn():
        turns.append("in")
        yield
        turns.append("out")

    spec = bench.BenchSpec(model=V2, precisions=["int8", "fp32"], prompt_tokens=[16, 8], new_tokens=4)
    report = bench.run(spec, on_event=events.append, turn=turn)
    return report, events, turns


def test_one_result_per_precision_and_prompt_length(fixture_run):
    report, _, _ = fixture_run
    assert not report["cancelled"]
    rows = [(r["precision"], r["prompt_tokens"]) for r in report["results"]]
    assert rows == [("fp32", 8), ("fp32", 16), ("int8", 8), ("int8", 16)]   # the reference runs first
    for r in report["results"]:
        assert set(bench.RESULT_KEYS) <= set(r) and r["error"] is None
        assert {"cpu", "cores", "ram_gb", "gpu", "torch", "bandwidth_gbps"} <= set(r["machine"])
    assert report["spec"]["model"] == V2 and report["machine"]["bandwidth_gbps"] > 0


def test_figures_are_positive_and_in_their_units(fixture_run):
    report, _, _ = fixture_run
    fp32_bytes = tensor_bytes(load_model(V2, "fp32"))
    for r in report["results"]:
        assert r["load_s"] > 0 and r["new_tokens"] == 4 and r["repeats"] == 1 and r["device"] == "cpu"
        assert 0 < r["weights_gb"] <= fp32_bytes / bench.GIB
        assert 0.05 < r["rss_gb"] <= r["peak_rss_gb"] < 16          # GiB: neither bytes nor KiB
        assert r["load_peak_rss_gb"] <= r["peak_rss_gb"]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["vram_peak_gb"] is None
        assert r["prompt_tokens"] / r["prefill_tok_s"] <= r["ttft_s"]   # ttft = prefill + the first sample
        per_token = r["bytes_per_token_gb"] * bench.GIB
        assert r["decode_limit_tok_s"] == pytest.approx(r["machine"]["bandwidth_gbps"] * 1e9 / per_token, rel=0.01)
        assert r["decode_fraction_of_limit"] == pytest.approx(r["decode_tok_s"] / r["decode_limit_tok_s"])
    fp32, int8 = report["results"][0], report["results"][2]
    assert fp32["weights_gb"] == fp32_bytes / bench.GIB
    assert int8["weights_gb"] < fp32["weights_gb"]
    assert report["results"][1]["bytes_per_token_gb"] > fp32["bytes_per_token_gb"]   # a longer cache to read


def test_quality_against_the_highest_precision(fixture_run):
    report, _, _ = fixture_run
    fp32, int8 = report["results"][0], report["results"][2]
    assert (fp32["top1_agreement"], fp32["mean_kl"]) == (1.0, 0.0) and "reference" in fp32["quality_note"]
    assert 0 <= int8["top1_agreement"] <= 1 and int8["mean_kl"] > 0 and "fp32" in int8["quality_note"]
    # the same figures computed here, in process and in fp32
    logprobs = {}
    for precision in ("fp32", "int8"):
        engine = glm_core.load(V2, precision)
        marks = [engine.tokenizer.special_ids["[gMASK]"], engine.tokenizer.special_ids["sop"]]
        ids = marks + bench.text_ids(engine.encode, min(bench.QUALITY_TOKENS, engine.context_length - 2))
        logprobs[precision] = torch.log_softmax(engine.logits(ids)[1:-1, :engine.vocab_limit], dim=-1)
    p, q = logprobs["fp32"], logprobs["int8"]
    assert int8["top1_agreement"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).float().mean().item(), abs=1e-6)
    assert int8["mean_kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=0.05)
    targets = torch.tensor(ids[2:])
    for precision, row in (("fp32", fp32), ("int8", int8)):
        nll = -logprobs[precision].gather(1, targets[:, None]).mean().item()
        assert row["perplexity"] == pytest.approx(math.exp(nll), rel=1e-3)


def test_progress_results_and_turns(fixture_run):
    report, events, turns = fixture_run
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[0]["done"] == 0 and progress[0]["eta_s"] is None
    assert [e["done"] for e in progress] == list(range(len(progress)))
    assert progress[-1]["done"] == progress[-1]["total"] == 2 * (1 + 2 + 1)   # load, 2 prompt lengths, quality
    assert all(e["eta_s"] >= 0 for e in progress[1:])
    assert [e["result"] for e in events if e["type"] == "result"] == report["results"]
    assert turns == ["in", "out", "in", "out"]   # one turn per child process


def test_random_weights_are_written_once_and_have_no_quality(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "SHARD_BYTES", 400_000)
    config = FIXTURES / "v2" / "config.json"
    spec = bench.BenchSpec(model=f"random:{config}", precisions=["int4"], prompt_tokens=[8], new_tokens=3)
    report = bench.run(spec)
    [r] = report["results"]
    assert r["error"] is None and r["decode_tok_s"] > 0 and r["prompt_tokens"] == 8
    assert (r["top1_agreement"], r["mean_kl"], r["perplexity"]) == (None, None, None)
    assert r["quality_note"] == bench.RANDOM_NOTE

    [folder] = tmp_path.glob("random-*")   # beside it, on AVX2 CPUs: native/, the compiled AVX2 products
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    model = build_model(load_config(config.parent), torch.float16)
    assert set(index["weight_map"]) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    stamp = (folder / shards[0]).stat().st_mtime_ns
    assert bench.random_checkpoint(str(config)) == folder and (folder / shards[0]).stat().st_mtime_ns == stamp


def test_child_measures_random_v1_weights(tmp_path, monkeypatch, capsys):
    """The child's code in process, on ChatGLM-6B's layout: its prompts need [gMASK] <sop> after the context."""
    monkeypatch.setenv("GLM_STUDIO_CACHE", str(tmp_path))
    folder = bench.random_checkpoint(str(FIXTURES / "v1"))
    assert folder.name.startswith("random-") and load_model(folder, "fp32").lm_head is not None
    job = {"model": "random:v1", "model_dir": str(folder), "precision": "bf16", "device": "cpu",
           "prompt_tokens": [6, 12], "new_tokens": 3, "repeats": 2, "bandwidth_gbps": 10.0, "quality_dir": None}
    bench.child(job)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in events] == ["step"] * 5 + ["done"]
    done = events[-1]
    assert done["quality"] is None and [r["prompt_tokens"] for r in done["results"]] == [6, 12]
    assert all(r["decode_tok_s"] > 0 and r["decode_limit_tok_s"] > 0 for r in done["results"])


def test_bytes_read_per_token_skip_untied_embeddings():
    v2 = load_model(V2, "fp32")
    embedding = v2.transformer.embedding.word_embeddings.weight.nbytes
    assert bench.bytes_read_per_token(v2) == tensor_bytes(v2) - embedding
    v1 = load_model(FIXTURES / "v1", "fp32")   # lm_head shares the embedding: read whole every token
    assert bench.bytes_read_per_token(v1) == tensor_bytes(v1)
    for name, precision in (("v2", "int4"), ("v1", "int8")):   # int8 tables: the same rule
        model = load_model(FIXTURES / name, precision)
        table = model.get_submodule("transformer.embedding.word_embeddings" if name == "v2"
                                    else "transformer.word_embeddings")
        lookup_only = table.qweight.nbytes + table.scales.nbytes if name == "v2" else 0
        assert bench.bytes_read_per_token(model) == tensor_bytes(model) - lookup_only


def test_cli_prints_a_table_then_json(capsys):
    bench.main([V2, "--precision", "bf16", "--prompt-tokens", "8", "--new-tokens", "3", "--no-quality"])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    report = json.loads(lines[-1])
    [r] = report["results"]
    assert r["precision"] == "bf16" and r["prompt_tokens"] == 8 and r["new_tokens"] == 3 and r["decode_tok_s"] > 0
    assert r["quality_note"] == "quality not measured (turned off)"
    header = next(line for line in lines if "decode tok/s" in line)
    row = lines[lines.index(header) + 1].split()
    assert row[:3] == ["bf16", "8", "3"]
    assert "[1/" in out.err   # progress goes to stderr


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([V2, "--precision", "int3"])
    assert exit_info.value.code == 2 and "int3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--random", "chatglm9-6b"])
    assert "chatglm2-6b" in capsys.readouterr().err


def test_concurrent_streams_report_aggregate_and_batched_decode():
    # the streams decode together long enough for the token counts sampled every bench.SAMPLE_S to see it: 48 tokens
    # each took about 40 ms together on the tiny fixture, and one suite run in three saw fewer than two samples there
    spec = bench.BenchSpec(model=V2, precisions=["fp32"], prompt_tokens=[8], new_tokens=256, concurrent=[1, 3],
                           quality=False)
    rows = bench.run(spec)["results"]
    assert [r["concurrency"] for r in rows] == [1, 3] and all(r["error"] is None for r in rows)
    three = rows[1]
    assert three["ttft_max_s"] >= three["ttft_s"] > 0
    assert three["aggregate_decode_tok_s"] > three["decode_tok_s"] > 0   # three streams outrun one of them
    assert three["batched_decode_tok_s"] > 0   # measured while all three decode together


def test_cli_checks_the_free_disk_before_writing_random_weights(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**11, used=0, free=2 * 10**9))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--random", "chatglm2-6b"])
    assert exit_info.value.code == 2 and "only 2.0 GB is free" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cancel_kills_the_running_child():
    cancel = threading.Event()

    def on_event(event):
        if event["type"] == "progress" and event["done"] >= 1:   # the child has loaded and is measuring
            cancel.set()

    spec = bench.BenchSpec(model=V2, precisions=["fp32", "int8"], prompt_tokens=[8, 16], new_tokens=200)
    report = bench.run(spec, on_event=on_event, cancel=cancel)
    assert report["cancelled"] and report["results"] == []
    children = psutil.Process().children(recursive=True)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not any("--child" in " ".join(p.cmdline()) for p in alive)


def test_prefill_flops_count_every_block_product_however_it_is_stored(embedded_engine):
    """The embedded model's layers as GGUF codes (quant.GGUFLinear) and as QuantizedLinears (int4 of the fp32 weights,
    exact): the same products, the same count (the output layer runs on the last id only)."""
    from glm_core.engines import load_transformers
    model, n = embedded_engine.model, 100
    c = model.config
    weights = c.num_layers * c.hidden_size * ((c.num_heads + 2 * c.kv_groups) * c.head_dim + c.num_heads * c.head_dim
                                              + 3 * c.ffn_hidden_size)
    expected = 2.0 * weights * n + 2.0 * c.num_layers * n * n * c.num_heads * c.head_dim
    assert bench.prefill_flops(model, n) == expected
    assert bench.prefill_flops(load_transformers(glm_core.EMBEDDED, "int4", exact=True).model, n) == expected
