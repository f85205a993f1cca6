"""The generation loop shared by every engine: prefill, decode_one_token, sample, stream text.

A model here is anything with `prefill(ids) -> logits`, `decode_one_token(token) -> logits`,
`logits(ids)`, `reset_cache()` and `cached_ids` (the native GLM models and the transformers adapter).
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class CausalLM(Protocol):
    cached_ids: list[int]

    def logits(self, ids: list[int]) -> torch.Tensor: ...
    def prefill(self, ids: list[int]) -> torch.Tensor: ...
    def decode_one_token(self, token: int) -> torch.Tensor: ...
    def reset_cache(self) -> None: ...


class PromptTooLongError(ValueError):
    """The newest turn alone does not fit the model's context."""


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    max_length: int | None = None    # official v1/v2 cap on prompt + reply; None = the model's context
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0                   # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationParams":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    dropped_turns: int = 0      # oldest turns left out so the prompt fits the context
    ttft_s: float = 0.0         # time to first token (prefill + first sample)
    prefill_tok_s: float = 0.0  # prompt tokens / ttft (a prompt extending the cached one costs less)
    decode_tok_s: float = 0.0
    finish_reason: str = ""     # stop | length | stopped | error
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        return d


def logits_processors(params: GenerationParams) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if params.repetition_penalty and params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature and params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k and params.top_k > 0:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
    return procs


def sample(logits: torch.Tensor, history: torch.Tensor, procs: LogitsProcessorList,
           do_sample: bool, generator: torch.Generator | None) -> int:
    scores = procs(history[None], logits[None].float()) if procs else logits[None].float()
    if not do_sample:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: CausalLM, prompt_ids: list[int], params: GenerationParams, stop_ids: set[int],
             context_length: int, vocab_limit: int | None = None, stop: threading.Event | None = None,
             stats: ReplyStats | None = None) -> Iterator[int]:
    """Yield new token ids; the stop id is yielded too when one ends the reply (as HF generate)."""
    stats = stats if stats is not None else ReplyStats()
    limit = min(params.max_length or context_length, context_length)
    budget = min(params.max_new_tokens, limit - len(prompt_ids))
    if budget <= 0:
        raise PromptTooLongError(
            f"the prompt has {len(prompt_ids)} tokens; the limit for prompt + reply is {limit}")
    procs = logits_processors(params)
    generator = None
    if params.do_sample and params.seed is not None:
        generator = torch.Generator().manual_seed(int(params.seed))
    # Ids seen so far, preallocated once, for the repetition penalty.
    history = torch.empty(len(prompt_ids) + budget, dtype=torch.long)
    history[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    n = len(prompt_ids)

    stats.prompt_tokens = len(prompt_ids)
    stats.finish_reason = "length"
    t0 = time.perf_counter()
    logits = model.prefill(prompt_ids)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[vocab_limit:] = float("-inf")   # padded rows have no token to decode
    t_first = None
    for _ in range(budget):
        if stop is not None and stop.is_set():
            stats.finish_reason = "stopped"
            break
        token = sample(logits, history[:n], procs, params.do_sample, generator)
        history[n] = token
        n += 1
        stats.new_tokens += 1
        stats.token_ids.append(token)
        if t_first is None:
            t_first = time.perf_counter()
            stats.ttft_s = t_first - t0
            stats.prefill_tok_s = len(prompt_ids) / stats.ttft_s if stats.ttft_s > 0 else 0.0
        if token in stop_ids:
            stats.finish_reason = "stop"
            yield token
            break
        yield token
        if stats.new_tokens == budget:
            break
        logits = model.decode_one_token(token)
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[vocab_limit:] = float("-inf")
        elapsed = time.perf_counter() - t_first
        stats.decode_tok_s = (stats.new_tokens - 1) / elapsed if elapsed > 0 else 0.0
    if stats.finish_reason != "stopped" and stop is not None and stop.is_set():
        stats.finish_reason = "stopped"


class TextStream:
    """Turns token ids into text deltas without re-decoding the whole reply and without
    splitting a multi-byte character: decode a short window and emit what it adds."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0   # window start: one step behind, so leading-space rules stay right
        self.read = 0     # ids already turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is left when the reply ends (e.g. an incomplete byte sequence)."""
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""
