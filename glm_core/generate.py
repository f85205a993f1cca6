"""Generation: the parameters and stats of a reply, its token choices, and the loop for one sequence.

`Decoding` is one reply's token choices (sampling with its own generator, its budget, its stop ids, its stats).
`generate` runs one prompt through a batcher (batch.py) as a batch of one; the model service (service.py) runs
many `Decoding`s through the same batcher verbs, so a reply is chosen the same way alone or in a batch.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


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

    @classmethod
    def checked(cls, d: object) -> "GenerationParams":
        """Parameters from untrusted input (an import, an API request): a dict of known keys with values of the
        right type and range, else ValueError saying which key is wrong and what it takes."""
        if not isinstance(d, dict):
            raise ValueError(f"generation parameters must be an object of named values, not {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {', '.join(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        for key, value in d.items():
            rule = PARAM_RULES[key]
            if value is None and rule.optional:
                continue
            if isinstance(value, bool) != (rule.kind is bool) or not isinstance(value, rule.kind):
                raise ValueError(f"{key} must be {rule.describe()}, got {value!r}"[:300])
            if rule.kind is not bool and not (rule.low <= value <= rule.high):
                raise ValueError(f"{key} must be {rule.describe()}, got {value!r}"[:300])
        params = cls.from_dict(d)
        if params.do_sample and params.temperature <= 0:
            raise ValueError("temperature must be above 0 when sampling (do_sample false gives the greedy reply)")
        return params


@dataclass(frozen=True)
class ParamRule:
    kind: type | tuple[type, ...]
    low: float = 0
    high: float = 0
    optional: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is int:
            span = f"an integer from {int(self.low):,} to {int(self.high):,}"
        else:
            span = f"a number from {self.low:g} to {self.high:g}"
        return span + (" or null" if self.optional else "")


PARAM_RULES = {
    "max_new_tokens": ParamRule(int, 1, 1 << 20),
    "max_length": ParamRule(int, 1, 1 << 24, optional=True),
    "do_sample": ParamRule(bool),
    "temperature": ParamRule((int, float), 0, 100),
    "top_p": ParamRule((int, float), 1e-6, 1),
    "top_k": ParamRule(int, 0, 1 << 20),
    "repetition_penalty": ParamRule((int, float), 1e-3, 100),
    "seed": ParamRule(int, 0, (1 << 63) - 1, optional=True),
}


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    dropped_turns: int = 0      # oldest turns left out so the prompt fits the context
    wait_s: float = 0.0         # waiting for a place in the batch
    ttft_s: float = 0.0         # time to first token once in the batch (prefill + first sample)
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


class Decoding:
    """The token choices of one reply to prompt ids: sampled with its own generator (seeded when params.seed is
    set), at most its budget of new tokens (params and the context), ending on a stop id. `stats` fill in as it
    goes: ttft_s counts from `started` (set when its prefill begins)."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, stop_ids: set[int], context_length: int,
                 vocab_limit: int | None = None, stats: ReplyStats | None = None):
        limit = min(params.max_length or context_length, context_length)
        self.budget = min(params.max_new_tokens, limit - len(prompt_ids))
        if self.budget <= 0:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens; the limit for prompt + reply is {limit}")
        self.params, self.stop_ids, self.vocab_limit = params, stop_ids, vocab_limit
        self.procs = logits_processors(params)
        self.generator = None
        if params.do_sample and params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(params.seed))
        # ids seen so far, preallocated once, for the repetition penalty
        self.history = torch.empty(len(prompt_ids) + self.budget, dtype=torch.long)
        self.history[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        self.length = len(prompt_ids)
        self.stats = stats if stats is not None else ReplyStats()
        self.stats.prompt_tokens, self.stats.finish_reason = len(prompt_ids), "length"
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.done = False

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from the logits after the last one; the reply is done after a stop id or its budget."""
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[self.vocab_limit:] = float("-inf")   # padded rows have no token to decode
        token = sample(logits, self.history[:self.length], self.procs, self.params.do_sample, self.generator)
        self.history[self.length] = token
        self.length += 1
        stats, now = self.stats, time.perf_counter()
        stats.new_tokens += 1
        stats.token_ids.append(token)
        if self.first_at is None:
            self.first_at = now
            stats.ttft_s = now - self.started
            stats.prefill_tok_s = stats.prompt_tokens / stats.ttft_s if stats.ttft_s > 0 else 0.0
        elif now > self.first_at:
            stats.decode_tok_s = (stats.new_tokens - 1) / (now - self.first_at)
        if token in self.stop_ids:
            stats.finish_reason, self.done = "stop", True
        elif stats.new_tokens == self.budget:
            self.done = True
        return token

    def stop(self, reason: str = "stopped") -> None:
        self.stats.finish_reason, self.done = reason, True


def generate(batcher, prompt_ids: list[int], params: GenerationParams, stop_ids: set[int], context_length: int,
             vocab_limit: int | None = None, stop: threading.Event | None = None, stats: ReplyStats | None = None,
             key: str | None = None) -> Iterator[int]:
    """Yield the new token ids of one reply, run alone through the batcher; the stop id is yielded too when one
    ends the reply (as HF generate). `stop` ends it within one token."""
    decoding = Decoding(prompt_ids, params, stop_ids, context_length, vocab_limit, stats)
    seq = batcher.open(prompt_ids, key)
    try:
        logits = None
        while logits is None:
            if stop is not None and stop.is_set():
                decoding.stop()
                return
            logits = batcher.step(seq, []).get(seq)
        while True:
            if stop is not None and stop.is_set():
                decoding.stop()
                return
            token = decoding.choose(logits)
            yield token
            if decoding.done:
                return
            logits = batcher.step(None, [(seq, token)])[seq]
    finally:
        batcher.close(seq)


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
