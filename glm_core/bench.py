"""The benchmark: load time, memory, prefill and decode speed, and quality of one model at several precisions.

    python -m glm_core.bench MODEL|--random chatglm2-6b --precision int4,int8,bf16 --prompt-tokens 32,512 --new-tokens 128
    python -m glm_core.bench MODEL --concurrent 1,2,4,8 ...   # streams at once through the model service

prints a table and, as its last line, one JSON object. Each precision runs in a child process of its own, so
its load time, resident memory and peak RSS are its own and not the parent's. Decode speed is also reported
as a fraction of what the machine's memory bandwidth allows (each decoded token reads every weight once):
that ratio survives noisy machines. Quality (top-1 agreement and mean KL against the highest precision in
the run, perplexity) is measured on the bundled text; random weights have none.

Sizes are GiB (2**30 bytes); bandwidth is GB/s (1e9 bytes).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np
import psutil
import torch
from torch import nn

from .engines import Engine, tensor_bytes
from .kvcache import KVCache
from .quant import GGUFLinear, Int8Embedding, QuantizedLinear, storage_key
from .registry import PRECISIONS, cache_root
from .service import ModelService
from .threads import ThreadPolicy

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
EVAL_TEXT = Path(__file__).with_name("eval_text.txt")
RANK = {"fp32": 3, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0}   # the highest in a run is the quality reference
QUALITY_TOKENS = 512        # tokens of the bundled text scored for quality: seconds on SmolLM2-135M
WARMUP_TOKENS = 80          # the warm-up runs decode and a prompt (the dense path where quant.dense_min_rows() is lower)
BANDWIDTH_MIB = 2048        # far beyond any CPU's last-level cache (260 MiB on the largest seen here)
SHARD_BYTES = 2 * 10**9     # random checkpoints come in shards of about this size, as the official ones
RANDOM = "random:"
SAMPLE_S = 0.02             # how often the concurrency run counts the tokens generated so far
RANDOM_NOTE = "random weights: quality cannot be measured"

# The official config.json of each model, as far as the loader reads it.
CHATGLM2_6B = {
    "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696, "num_attention_heads": 32,
    "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 65024,
    "seq_length": 32768, "layernorm_epsilon": 1e-05, "add_qkv_bias": True, "add_bias_linear": False,
    "rmsnorm": True, "post_layer_norm": True, "original_rope": True, "tie_word_embeddings": False,
    "torch_dtype": "float16", "eos_token_id": 2, "pad_token_id": 0,
}
RANDOM_CONFIGS = {
    "chatglm-6b": {
        "_name_or_path": "THUDM/chatglm-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "num_layers": 28, "hidden_size": 4096, "inner_hidden_size": 16384, "num_attention_heads": 32,
        "vocab_size": 130528, "max_sequence_length": 2048, "layernorm_epsilon": 1e-05, "position_encoding_2d": True,
        "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
        "pad_token_id": 3, "torch_dtype": "float16",
    },
    "chatglm2-6b": CHATGLM2_6B,
    "chatglm3-6b": {**CHATGLM2_6B, "_name_or_path": "THUDM/chatglm3-6b", "seq_length": 8192},
}

# Published reference figures, shown beside measured ones (GB as the sources write it).
PUBLISHED = {
    "chatglm2-6b": [
        {"what": "minimum GPU memory to encode 2048 tokens",
         "values": {"fp16": 13.1, "bf16": 13.1, "int8": 8.2, "int4": 5.5}, "unit": "GB",
         "source": "THUDM/ChatGLM2-6B README, inference efficiency",
         "conditions": "official code on GPU; decoding 8192 tokens: 12.8 / 8.1 / 5.1 GB"},
        {"what": "MMLU accuracy", "values": {"bf16": 45.47, "int4": 43.13}, "unit": "%",
         "source": "THUDM/ChatGLM2-6B README, quantization table", "conditions": "C-Eval dev: 53.57 bf16, 50.30 int4"},
        {"what": "generation speed", "values": {"bf16": 44.62}, "unit": "tokens/s",
         "source": "THUDM/ChatGLM2-6B README, inference efficiency",
         "conditions": "average over 2000 generated tokens, batch 1, max length 2048, A100-SXM4-80G, PyTorch 2.0 "
                       "(the Chinese README says characters/s); ChatGLM-6B: 31.49"},
    ],
}


# Every result object has these keys (None where not measured); `error` is set when its child failed.
RESULT_KEYS = ("model", "precision", "device", "busy", "prompt_tokens", "new_tokens", "repeats", "concurrency", "load_s",
               "weights_gb", "rss_gb", "load_peak_rss_gb", "peak_rss_gb", "vram_peak_gb", "prefill_tok_s",
               "prefill_gflops", "ttft_s", "ttft_max_s", "decode_tok_s", "aggregate_decode_tok_s", "batched_decode_tok_s",
               "threads", "bytes_per_token_gb", "decode_limit_tok_s", "decode_fraction_of_limit", "top1_agreement", "mean_kl",
               "perplexity", "quality_note", "machine", "error")


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message says why."""


class Cancelled(Exception):
    """The caller's cancel event was set."""


@dataclass
class BenchSpec:
    model: str                       # registry name / dir / .gguf / Hub id, or random:chatglm2-6b (random:CONFIG.json)
    precisions: list[str]
    prompt_tokens: list[int]
    new_tokens: int = 128
    repeats: int = 1                 # decode/prefill figures = median over repeats
    device: str = "cpu"
    quality: bool = True             # top-1 / KL / perplexity vs the highest precision in the run
    concurrent: list[int] = field(default_factory=list)   # streams at once through the model service (else one)
    busy: bool = False               # another process keeps one core busy while each precision is measured


def check_spec(spec: BenchSpec) -> None:
    unknown = [p for p in spec.precisions if p not in PRECISIONS]
    if not spec.precisions or unknown:
        raise BenchError(f"precisions must be some of {', '.join(PRECISIONS)}, got {spec.precisions}")
    if not spec.prompt_tokens or min(spec.prompt_tokens) < 4:
        raise BenchError(f"prompt lengths must be at least 4 tokens, got {spec.prompt_tokens}")
    if spec.new_tokens < 2:
        raise BenchError(f"new tokens must be at least 2 (one from the prefill, one decoded), got {spec.new_tokens}")
    if spec.repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {spec.repeats}")
    if any(c < 1 for c in spec.concurrent):
        raise BenchError(f"concurrency must be at least 1, got {spec.concurrent}")
    if spec.model.startswith(RANDOM):
        random_config(spec.model[len(RANDOM):])
        check_disk(spec)


# ---------------------------------------------------------------------------------------------
# the machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bandwidth_gbps() -> float:
    """Read bandwidth with the threads torch uses: the best of a few reads of a tensor far beyond the caches (a
    buffer near the last-level cache's size reads partly from the cache: 14.6-28.8 GB/s for 256 MiB against an
    L3 of 260 MiB, where 2 GiB reads a steady 27.9), each read as a sum and as a matrix-vector product. A sum is
    one stream per thread, which one core cannot keep full: on a 2-core AMX Xeon it read 23.9-26.3 GB/s where
    torch.mv (a few rows at a time) read 30-31 and a C loop over 8 streams with prefetch 32; decode kernels read 8
    rows at once, so the sum alone put them above 100 % of it. MKL's mv is slow on AMD CPUs, where the sum wins."""
    x = torch.ones(BANDWIDTH_MIB * 2**20 // 4)
    rows, ones = x.view(-1, 1 << 16), torch.ones(1 << 16)
    best = math.inf
    for _ in range(5):
        for read in (x.sum, lambda: torch.mv(rows, ones)):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def machine_info(measure_bandwidth: bool = True) -> dict:
    return {
        "cpu": cpu_name(), "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ram_gb": round(psutil.virtual_memory().total / GIB, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "load_avg": round(psutil.getloadavg()[0], 2),
        "bandwidth_gbps": round(memory_bandwidth_gbps(), 2) if measure_bandwidth else None,
    }


# ---------------------------------------------------------------------------------------------
# random weights at true size, in the official layout


def random_config(name: str) -> tuple[str, dict]:
    """(cache directory name, config.json) for random:NAME, NAME a known model or a ChatGLM config.json (or its dir)."""
    if name in RANDOM_CONFIGS:
        return f"random-{name}", RANDOM_CONFIGS[name]
    path = Path(name).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise BenchError(f"random:{name}: give one of {', '.join(RANDOM_CONFIGS)} or the path of a ChatGLM config.json")
    text = path.read_text(encoding="utf-8")
    return f"random-{hashlib.sha256(text.encode()).hexdigest()[:12]}", json.loads(text)


def random_checkpoint_bytes(name: str) -> int:
    """Bytes a random checkpoint of random:NAME takes on disk (fp16 weights)."""
    from .checkpoint import build_model
    from .config import GLMConfig, load_config
    _, raw = random_config(name)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw), encoding="utf-8")
        config: GLMConfig = load_config(folder)
    return sum(p.numel() * 2 for p in build_model(config, torch.float16).parameters())


def check_disk(spec: "BenchSpec") -> None:
    """BenchError when random weights must be written and the disk under cache_root() cannot hold them."""
    if not spec.model.startswith(RANDOM):
        return
    name = spec.model[len(RANDOM):]
    dirname, _ = random_config(name)
    if (cache_root() / dirname / "model.safetensors.index.json").is_file():
        return
    need = random_checkpoint_bytes(name) + GIB   # and room to spare
    folder = cache_root()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise BenchError(f"{spec.model} writes {need / 1e9:.1f} GB of random weights under {cache_root()} "
                         f"(GLM_STUDIO_CACHE); only {free / 1e9:.1f} GB is free there")


def random_checkpoint(name: str, on_shard: Callable[[int, int], None] | None = None) -> Path:
    """An fp16 checkpoint of random weights (seeded, scale 0.02, norms 1) with the official names, shards and
    index, written once under cache_root() and reused. One shard is in memory at a time."""
    from safetensors.torch import save_file

    from .checkpoint import build_model
    from .config import load_config
    dirname, raw = random_config(name)
    target = cache_root() / dirname
    if (target / "model.safetensors.index.json").is_file():   # written last: its presence means complete
        return target
    partial = target.with_name(dirname + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    params = build_model(load_config(partial), torch.float16).named_parameters(remove_duplicate=False)
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for param_name, param in params:   # meta tensors: shapes only
        if size and size + param.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((param_name, param.shape))
        size += param.nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        if on_shard is not None:
            on_shard(k, len(shards))
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for param_name, shape in shard:
            if param_name.endswith("layernorm.weight"):
                tensors[param_name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[param_name] = torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)
            weight_map[param_name] = filename
            total += tensors[param_name].nbytes
        save_file(tensors, str(partial / filename), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


# ---------------------------------------------------------------------------------------------
# the child: one precision, loaded once, every prompt length


@dataclass
class Subject:
    """What the child measures: an engine, its module (for bytes) and where its ids come from."""
    engine: Engine
    module: nn.Module
    prompt: Callable[[int], list[int]]              # prompt ids of a given length
    quality_ids: Callable[[], tuple[list[int], int]] | None = None   # (ids, first scored position); None: random


def text_ids(encode: Callable[[str], list[int]], n: int) -> list[int]:
    """The first n ids of the bundled text, repeated as needed."""
    ids = encode(EVAL_TEXT.read_text(encoding="utf-8"))
    return (ids * (n // len(ids) + 1))[:n]


def random_engine(model_dir: str, precision: str, device: str) -> tuple[Engine, Callable[[int], list[int]]]:
    """An engine on random weights (no tokenizer: prompts are random ids, replies have no text), and its prompts."""
    from .batch import NativeBatcher
    from .checkpoint import load_model
    from .engines import graphed_decode
    from .config import load_config
    config = load_config(model_dir)
    model = load_model(model_dir, precision, device)

    def random_prompt(n: int) -> list[int]:
        generator = torch.Generator().manual_seed(n)
        if config.version == 1:   # ChatGLM-6B needs its [gMASK] <sop> after the context; ids below the specials
            body = torch.randint(0, config.mask_token_id, (n - 2,), generator=generator).tolist()
            return body + [config.gmask_token_id, config.bos_token_id]
        return torch.randint(0, config.vocab_size, (n,), generator=generator).tolist()

    def no_text(ids: list[int]) -> str:
        return ""
    engine = Engine(name=f"random {model_dir}", family=f"chatglm{config.version}", precision=precision, device=device,
                    model=model, batcher=NativeBatcher(model, graphed=graphed_decode(model, device)),
                    encode=lambda text: [], decode=no_text,
                    build_prompt=lambda messages: [], stop_ids={config.eos_token_id}, context_length=config.seq_length,
                    weights_bytes=tensor_bytes(model))
    return engine, random_prompt


def load_subject(job: dict) -> Subject:
    precision, device = job["precision"], job["device"]
    if job["model"].startswith(RANDOM):
        engine, random_prompt = random_engine(job["model_dir"], precision, device)
        return Subject(engine, engine.model, random_prompt)

    from . import load
    engine = load(job["model"], precision, device)
    if engine.family == "transformers":
        marks, first = [], 0
    else:   # the official prompt marks; the text after them is scored, as a reply is generated after them
        special = engine.tokenizer.special_ids
        marks, first = [special["[gMASK]"], special.get("<sop>", special.get("sop"))], 1

    def prompt(n: int) -> list[int]:
        if engine.family == "chatglm1":
            return text_ids(engine.encode, n - 2) + marks
        return marks + text_ids(engine.encode, n - len(marks))

    def quality_ids() -> tuple[list[int], int]:
        n = min(QUALITY_TOKENS, engine.context_length - len(marks))
        return marks + text_ids(engine.encode, n), first
    return Subject(engine, engine.model, prompt, quality_ids)


def bytes_read_per_token(module: nn.Module) -> int:
    """Bytes of weights a decode step reads: every tensor once, except embedding tables (one row is looked up)
    unless an output layer shares them."""
    def own(m: nn.Module) -> list[torch.Tensor]:
        return [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]

    def is_table(m: nn.Module) -> bool:
        return isinstance(m, (nn.Embedding, Int8Embedding))
    elsewhere = {storage_key(t) for m in module.modules() if not is_table(m) for t in own(m)}
    lookup_only = {storage_key(t): t.nbytes for m in module.modules() if is_table(m)
                   for t in own(m) if storage_key(t) not in elsewhere}
    return tensor_bytes(module) - sum(lookup_only.values())


def kv_bytes_per_position(batcher, seq) -> float:
    """K/V bytes one cached position of a sequence holds: its KVCache (native), or its row of the padded batch."""
    if isinstance(seq.cache, KVCache):
        return seq.cache.nbytes / max(seq.cache.capacity, 1)
    layers = getattr(batcher.cache, "layers", [])
    tensors = [t for layer in layers for t in (layer.keys, layer.values)]
    return sum(t[0].nbytes for t in tensors) / max(batcher.mask.shape[1], 1)


def prefill_flops(module: nn.Module, n: int) -> float:
    """Multiply-adds x 2 of a prefill of n ids: every block linear on every id (the output layer on the last one
    only), and causal attention (scores and values: 2 * n^2/2 * width per layer, x 2 for the add)."""
    linear_types = (nn.Linear, QuantizedLinear, GGUFLinear)
    heads = [m for name, m in module.named_modules() if isinstance(m, linear_types)
             and not name.endswith(("output_layer", "lm_head"))]
    weights = sum(m.in_features * m.out_features for m in heads)
    config = getattr(module, "config", None)
    layers = getattr(config, "num_layers", None) or getattr(config, "num_hidden_layers", 0)
    width = (getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", 0)) * (
        getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // max(getattr(config, "num_attention_heads", 1), 1))
    return 2.0 * weights * n + 2.0 * layers * n * n * width


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def greedy(logits: torch.Tensor, vocab_limit: int | None) -> int:
    return int(logits[:vocab_limit].argmax())


def time_generation(subject: Subject, ids: list[int], new_tokens: int, device: str, threads: ThreadPolicy) -> dict:
    """One greedy generation from an empty cache through the engine's batcher (a batch of one, as a lone visitor
    is served): prefill seconds, time to first token, decode seconds. Run it in the service's worker thread
    (`service.call`), with the service's thread policy, as the app's replies run."""
    batcher, vocab_limit = subject.engine.batcher, subject.engine.vocab_limit

    def step(prefill, decode):
        threads.update()
        return batcher.step(prefill, decode)
    batcher.clear()
    start = time.perf_counter()
    seq = batcher.open(ids)
    logits = None
    while logits is None:
        logits = step(seq, []).get(seq)
    sync(device)
    prefilled = time.perf_counter()
    token = greedy(logits, vocab_limit)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = greedy(step(None, [(seq, token)])[seq], vocab_limit)
    sync(device)
    end = time.perf_counter()
    kv = kv_bytes_per_position(batcher, seq)
    batcher.close(seq, keep=False)
    return {"prefill_s": prefilled - start, "ttft_s": first - start, "decode_s": end - first, "kv_bytes": kv,
            "threads": threads.threads}


def time_concurrent(service: ModelService, subject: Subject, n: int, streams: int, new_tokens: int) -> dict:
    """`streams` greedy requests of n-id prompts submitted at once to the model service around the engine (batched
    as visitors are): aggregate decode tokens/s from the first first token to the last token, the median stream's
    decode tokens/s, and the median and longest time to first token (from submission)."""
    from .generate import GenerationParams
    subject.engine.batcher.clear()
    params = GenerationParams(max_new_tokens=new_tokens, do_sample=False)
    requests = [service.submit(prompt_ids=subject.prompt(n), params=params) for _ in range(streams)]
    samples: list[tuple[float, int]] = []
    while not all(r.done for r in requests):
        samples.append((time.perf_counter(), sum(r.stats.new_tokens for r in requests)))
        time.sleep(SAMPLE_S)
    errors = [r.error for r in requests if r.error]
    if errors:
        raise BenchError(errors[0])
    decoded = sum(r.stats.new_tokens - 1 for r in requests)
    window = max(r.finished_at for r in requests) - min(r.first_token_at for r in requests)
    ttft = [r.first_token_at - r.submitted_at for r in requests]
    return {"aggregate_decode_tok_s": decoded / window, "batched_decode_tok_s": together(requests, samples),
            "ttft_s": statistics.median(ttft), "ttft_max_s": max(ttft),
            "decode_tok_s": statistics.median(r.stats.decode_tok_s for r in requests),
            "threads": service.threads.threads}


def together(requests: list, samples: list[tuple[float, int]]) -> float | None:
    """Tokens/s of all streams while every one of them decodes (after the last first token, before the first
    finish): the batch's own speed, without the joining prompts' prefills the aggregate figure also holds.
    `samples`: (time, tokens generated so far by all) taken as they ran."""
    start, end = max(r.first_token_at for r in requests), min(r.finished_at for r in requests)
    inside = [(t, n) for t, n in samples if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def peak_rss_bytes() -> int:
    """The process's highest resident memory so far."""
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):   # Windows
        return info.peak_wset
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # Linux counts KiB


def measure_quality(subject: Subject, path: Path) -> dict:
    """Log-probabilities of the bundled text's next tokens, saved for the parent; perplexity here in fp32."""
    ids, first = subject.quality_ids()
    logits = subject.engine.logits(ids)[first:-1, :subject.engine.vocab_limit].float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[first + 1:])
    nll = -logprobs.gather(1, targets[:, None]).mean().item()
    np.savez(path, logprobs=logprobs.half().numpy(), top1=logprobs.argmax(-1).int().numpy())
    return {"perplexity": math.exp(nll), "quality_tokens": len(targets), "file": str(path)}


def child(job: dict) -> None:
    """Measure one precision and print JSON lines: a `step` after each part, then `done` (or `error`)."""
    def say(**event):
        print(json.dumps(event), flush=True)

    precision, device, new_tokens = job["precision"], job["device"], job["new_tokens"]
    try:
        with torch.inference_mode():
            # the model loads and runs in a model service's worker thread, as the app's do
            loaded: list[Subject] = []

            def load(*args, **kwargs) -> Engine:
                loaded.append(load_subject(job))
                return loaded[0].engine
            start = time.perf_counter()
            service = ModelService(job["model"], precision, device, max_batch=max(job.get("concurrent") or [1]),
                                   load=load)
            try:
                service.ensure_loading()
                service.wait_loaded()
                subject = loaded[0]
                service.call(lambda: sync(device)).result()
                load_s = time.perf_counter() - start
                load_peak = peak_rss_bytes()
                gc.collect()
                rss = psutil.Process().memory_info().rss
                say(type="step", label=f"{precision}: loaded in {load_s:.1f} s")

                def solo(ids: list[int], tokens: int) -> dict:
                    return service.call(lambda: time_generation(subject, ids, tokens, device, service.threads)).result()
                warm = subject.prompt(min(WARMUP_TOKENS, max(job["prompt_tokens"])))
                solo(warm, 3)
                weights, read = tensor_bytes(subject.module), bytes_read_per_token(subject.module)
                results = []
                for n in sorted(job["prompt_tokens"]):
                    ids = subject.prompt(n)
                    runs = []
                    for r in range(job["repeats"]):
                        runs.append(solo(ids, new_tokens))
                        say(type="step", label=f"{precision}: prompt {n}, run {r + 1} of {job['repeats']}")
                    timing = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                    decode_tok_s = (new_tokens - 1) / timing["decode_s"]
                    # mean bytes a decode step reads: the weights, and the cache at the middle of the reply
                    per_token = read + timing["kv_bytes"] * (n + new_tokens / 2)
                    bandwidth = job.get("bandwidth_gbps")
                    limit = bandwidth * 1e9 / per_token if bandwidth and device == "cpu" else None
                    row = {
                        "model": job["model"], "precision": precision, "device": device, "prompt_tokens": n,
                        "new_tokens": new_tokens, "repeats": job["repeats"], "concurrency": 1, "load_s": load_s,
                        "weights_gb": weights / GIB, "rss_gb": rss / GIB, "load_peak_rss_gb": load_peak / GIB,
                        "peak_rss_gb": peak_rss_bytes() / GIB,
                        "vram_peak_gb": torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None,
                        "prefill_tok_s": n / timing["prefill_s"],
                        "prefill_gflops": prefill_flops(subject.module, n) / timing["prefill_s"] / 1e9,
                        "ttft_s": timing["ttft_s"], "decode_tok_s": decode_tok_s,
                        "aggregate_decode_tok_s": decode_tok_s, "batched_decode_tok_s": decode_tok_s,
                        "threads": timing["threads"], "bytes_per_token_gb": per_token / GIB,
                        "decode_limit_tok_s": limit, "decode_fraction_of_limit": decode_tok_s / limit if limit else None,
                    }
                    results.append(row)
                    for streams in sorted(set(job.get("concurrent") or []) - {1}):
                        timing = time_concurrent(service, subject, n, streams, new_tokens)
                        results.append({**row, "concurrency": streams, "prefill_tok_s": None, "prefill_gflops": None,
                                        "decode_limit_tok_s": None, "decode_fraction_of_limit": None,
                                        "peak_rss_gb": peak_rss_bytes() / GIB, **timing})
                        say(type="step", label=f"{precision}: prompt {n}, {streams} streams at once")
            finally:
                service.close()
            quality = None
            if job.get("quality_dir") and subject.quality_ids is not None:
                quality = measure_quality(subject, Path(job["quality_dir"]) / f"{precision}.npz")
                say(type="step", label=f"{precision}: quality on the bundled text")
        say(type="done", results=results, quality=quality)
    except Exception as e:   # the parent shows the message in the results
        say(type="error", message=f"{type(e).__name__}: {e}")
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# the parent


def run_child(job: dict, cancel: threading.Event, on_step: Callable[[str], None]) -> dict:
    """Run one child to its end and return its `done` event; kill it when `cancel` is set."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "glm_core.bench", "--child", json.dumps(job)]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=read, daemon=True).start()
        final = None
        while True:
            if cancel.is_set():
                proc.kill()
                proc.wait()
                raise Cancelled
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                event = json.loads(line)
            except json.JSONDecodeError:   # a library printing to stdout
                continue
            if not isinstance(event, dict):
                continue
            if event.get("type") == "step":
                on_step(event["label"])
            elif event.get("type") in ("done", "error"):
                final = event
        code = proc.wait()
        if final is not None and final["type"] == "done":
            return final
        if final is not None:
            raise BenchError(final["message"])
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip()[-1500:]
        killed = " (killed: out of memory?)" if code == -9 else ""
        raise BenchError(f"the benchmark process exited with code {code}{killed}: {tail}")


def compare(reference: Path, other: Path) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other)) of two saved next-token distributions."""
    ref, oth = np.load(reference), np.load(other)
    top1 = float((ref["top1"] == oth["top1"]).mean())
    kl_sum, rows = 0.0, ref["logprobs"].shape[0]
    for i in range(0, rows, 64):   # in row blocks: a full fp32 copy of a 65k vocabulary is large
        p = torch.from_numpy(ref["logprobs"][i:i + 64]).float()
        q = torch.from_numpy(oth["logprobs"][i:i + 64]).float()
        terms = p.exp() * (p - q)
        kl_sum += torch.where(p > -math.inf, terms, 0.0).sum().item()
    return top1, max(kl_sum / rows, 0.0)


def estimated_weights_gb(model: str, precision: str) -> float | None:
    from .registry import describe
    known = describe(model)
    return known.weights_gb(precision) * 1e9 / GIB if known is not None else None


@contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """A process spinning on the first core while the block runs (a desktop's browser, the app's own threads)."""
    if not on:
        yield
        return
    spin = "import os\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {0})\nwhile True: pass"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Progress:
    emit: Callable[[dict], None]
    total: int
    done: int = 0
    start: float = field(default_factory=time.monotonic)

    def step(self, label: str) -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.emit({"type": "progress", "done": self.done, "total": self.total, "label": label, "eta_s": eta})


def run(spec: BenchSpec, on_event: Callable[[dict], None] | None = None, cancel: threading.Event | None = None,
        turn: Callable[[], ContextManager] | None = None) -> dict:
    """Benchmark every precision of spec (one child process each, the highest precision first) and return
    {"machine", "spec", "results": one object per precision x prompt length, "cancelled"}."""
    check_spec(spec)
    emit = on_event or (lambda event: None)
    cancel = cancel or threading.Event()
    random = spec.model.startswith(RANDOM)
    precisions = sorted(dict.fromkeys(spec.precisions), key=lambda p: -RANK[p])
    quality = spec.quality and not random
    machine = machine_info(measure_bandwidth=True)
    streams = len(set(spec.concurrent) - {1})
    progress = Progress(emit, len(precisions) * (1 + len(spec.prompt_tokens) * (spec.repeats + streams) + int(quality)))
    emit({"type": "progress", "done": 0, "total": progress.total, "label": "starting", "eta_s": None})
    results: list[dict] = []
    reference: tuple[str, Path] | None = None    # (precision, saved distributions) of the quality reference
    cancelled = False
    try:
        model_dir = None
        if random:
            def on_shard(k: int, n: int) -> None:
                if cancel.is_set():
                    raise Cancelled
                if k == 1:
                    progress.total += n
                progress.step(f"writing random weights: shard {k} of {n}")
            model_dir = str(random_checkpoint(spec.model[len(RANDOM):], on_shard))
        with tempfile.TemporaryDirectory(prefix="glm-bench-") as quality_dir:
            for precision in precisions:
                if cancel.is_set():
                    raise Cancelled
                bandwidth = memory_bandwidth_gbps()
                job = {**asdict(spec), "precision": precision, "prompt_tokens": sorted(spec.prompt_tokens),
                       "model_dir": model_dir, "bandwidth_gbps": bandwidth,
                       "quality_dir": quality_dir if quality else None}
                now = {"bandwidth_gbps": round(bandwidth, 2), "load_avg": round(psutil.getloadavg()[0], 2)}
                base = {"model": spec.model, "precision": precision, "device": spec.device, "busy": spec.busy,
                        "new_tokens": spec.new_tokens, "repeats": spec.repeats, "machine": {**machine, **now}}
                try:
                    need = estimated_weights_gb(model_dir or spec.model, precision)
                    free = psutil.virtual_memory().available / GIB
                    if spec.device == "cpu" and need is not None and need > free:
                        raise BenchError(f"{precision} needs about {need:.1f} GiB for its weights, "
                                         f"{free:.1f} GiB is free")
                    with turn() if turn is not None else nullcontext(), busy_core(spec.busy):
                        outcome = run_child(job, cancel, progress.step)
                except BenchError as e:
                    outcome = {"results": [{"prompt_tokens": n, "error": str(e)} for n in sorted(spec.prompt_tokens)],
                               "quality": None}
                rows = [{**dict.fromkeys(RESULT_KEYS), **base, **row} for row in outcome["results"]]
                add_quality(rows, outcome["quality"], reference, random, quality)
                if outcome["quality"] is not None and reference is None:
                    reference = (precision, Path(outcome["quality"]["file"]))
                for row in rows:
                    results.append(row)
                    emit({"type": "result", "result": row})
    except Cancelled:
        cancelled = True
    return {"machine": machine, "spec": asdict(spec), "results": results, "cancelled": cancelled}


def add_quality(rows: list[dict], measured: dict | None, reference: tuple[str, Path] | None,
                random: bool, wanted: bool) -> None:
    """Fill top1_agreement, mean_kl, perplexity and quality_note of one precision's rows."""
    top1 = kl = perplexity = None
    if random:
        note = RANDOM_NOTE
    elif not wanted:
        note = "quality not measured (turned off)"
    elif measured is None:
        note = "quality not measured: the run failed"
    elif reference is None:
        top1, kl, perplexity = 1.0, 0.0, measured["perplexity"]
        note = f"reference for top-1 and KL ({measured['quality_tokens']} tokens of the bundled text)"
    else:
        top1, kl = compare(reference[1], Path(measured["file"]))
        perplexity = measured["perplexity"]
        note = f"against {reference[0]} on {measured['quality_tokens']} tokens of the bundled text"
    for row in rows:
        row.update(top1_agreement=top1, mean_kl=kl, perplexity=perplexity, quality_note=note)


# ---------------------------------------------------------------------------------------------
# the command line

COLUMNS = [("precision", "precision", "{}"), ("prompt", "prompt_tokens", "{}"), ("new", "new_tokens", "{}"),
           ("streams", "concurrency", "{}"), ("threads", "threads", "{}"),
           ("load s", "load_s", "{:.1f}"), ("weights GiB", "weights_gb", "{:.2f}"), ("rss GiB", "rss_gb", "{:.2f}"),
           ("peak GiB", "peak_rss_gb", "{:.2f}"), ("prefill tok/s", "prefill_tok_s", "{:.1f}"),
           ("GFLOP/s", "prefill_gflops", "{:.0f}"), ("ttft s", "ttft_s", "{:.2f}"),
           ("decode tok/s", "decode_tok_s", "{:.2f}"), ("all streams tok/s", "aggregate_decode_tok_s", "{:.2f}"),
           ("batched tok/s", "batched_decode_tok_s", "{:.2f}"),
           ("limit tok/s", "decode_limit_tok_s", "{:.2f}"), ("of limit", "decode_fraction_of_limit", "{:.0%}"),
           ("top-1", "top1_agreement", "{:.1%}"), ("mean KL", "mean_kl", "{:.4f}"), ("ppl", "perplexity", "{:.2f}")]


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"{report['spec']['model']} on {m['cpu']} ({m['cores']} cores, {m['ram_gb']} GiB, gpu {m['gpu']}), "
             f"torch {m['torch']}, read bandwidth {m['bandwidth_gbps']} GB/s, load average {m['load_avg']}"]
    cells = [[title for title, _, _ in COLUMNS]]
    for r in report["results"]:
        cells.append(["-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    notes = dict.fromkeys(f"{r['precision']}: {r.get('error') or r.get('quality_note')}" for r in report["results"])
    lines += list(notes)
    if report["cancelled"]:
        lines.append("cancelled")
    return "\n".join(lines)


def print_progress(event: dict) -> None:
    if event["type"] == "progress" and event["done"]:
        eta = f", about {event['eta_s']:.0f} s left" if event["eta_s"] is not None else ""
        print(f"[{event['done']}/{event['total']}] {event['label']}{eta}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glm_core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="registry name, local directory, .gguf file, Hub id, or random:NAME")
    parser.add_argument("--random", metavar="NAME",
                        help=f"random weights at true size: {', '.join(RANDOM_CONFIGS)} or the path of a config.json")
    parser.add_argument("--precision", default="bf16", help="comma-separated, of " + " ".join(PRECISIONS))
    parser.add_argument("--prompt-tokens", default="32,512", help="comma-separated prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="figures are medians over this many runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-quality", action="store_true", help="skip top-1 / KL / perplexity")
    parser.add_argument("--busy", action="store_true",
                        help="measure with another process keeping one core busy (as a desktop's browser does)")
    parser.add_argument("--concurrent", default="", metavar="N,M,...",
                        help="also run N (then M, ...) streams at once through the model service: aggregate and "
                             "per-stream decode tokens/s, time to first token")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    if (args.model is None) == (args.random is None):
        parser.error("give a MODEL or --random NAME")
    try:
        spec = BenchSpec(model=args.model or RANDOM + args.random, precisions=args.precision.split(","),
                         prompt_tokens=[int(n) for n in args.prompt_tokens.split(",")], new_tokens=args.new_tokens,
                         repeats=args.repeats, device=args.device, quality=not args.no_quality,
                         concurrent=[int(c) for c in args.concurrent.split(",") if c], busy=args.busy)
        check_spec(spec)
    except ValueError as e:
        parser.error(str(e))
    report = run(spec, on_event=print_progress)
    print(table(report))
    print(json.dumps(report))
    if report["cancelled"] or any(r.get("error") for r in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
