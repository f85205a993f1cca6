"""The model service: continuous batching equals solo generation, cancel, queue places, loads and switches."""
import threading
import time

import pytest

import glm_core
from conftest import FIXTURES
from glm_core import GenerationParams, PromptTooLongError
from glm_core.service import ModelService, ServiceBusy

GREEDY = GenerationParams(max_new_tokens=24, do_sample=False)


def serving(engine, **kw) -> ModelService:
    """A service around an engine already loaded (the loader hands it over)."""
    service = ModelService(engine.name, engine.precision, engine.device, load=lambda *a, **k: engine, **kw)
    service.ensure_loading()
    service.wait_loaded(30)
    return service


def until(request, condition, timeout: float = 60) -> None:
    """Wait for a request to reach a condition (it changes as the worker goes)."""
    deadline = time.time() + timeout
    while not condition(request):
        assert time.time() < deadline, f"still {request.status} after {timeout} s"
        request.wait(request.version, timeout=1)


def prompts(engine) -> list[list[int]]:
    questions = ["你好", "晚上睡不着应该怎么办", "Tell me about the sea and the sky, in several sentences please.",
                 "What is 2 + 2?"]
    return [engine.prompt_ids([{"role": "user", "content": q}]) for q in questions]


@pytest.fixture(scope="module", params=["v1", "v2", "v3"])
def glm_engine(request, one_thread):
    return glm_core.load(str(FIXTURES / request.param), precision="fp32")


def solo(engine, ids, params) -> list[int]:
    engine.reset()
    return engine.generate_ids(ids, **{k: v for k, v in params.to_dict().items() if k != "max_length"})


def joined_midway(service, engine, params_of) -> list:
    """The first prompt alone for a few tokens, then the others join while it runs."""
    ids = prompts(engine)
    first = service.submit(prompt_ids=ids[0], params=params_of(0))
    until(first, lambda r: r.stats.new_tokens >= 3 or r.done)
    rest = [service.submit(prompt_ids=p, params=params_of(i + 1), key=f"k{i}") for i, p in enumerate(ids[1:])]
    return [r.result(timeout=300) for r in [first] + rest]


def test_batched_greedy_equals_solo_greedy(glm_engine):
    service = serving(glm_engine)
    try:
        params_of = lambda i: GenerationParams(max_new_tokens=12 + 6 * i, do_sample=False)   # noqa: E731
        requests = joined_midway(service, glm_engine, params_of)
        assert max(r.stats.new_tokens for r in requests) > 12
        for i, (request, ids) in enumerate(zip(requests, prompts(glm_engine))):
            assert request.finish_reason in ("stop", "length") and not request.error
            assert request.stats.token_ids == solo(glm_engine, ids, params_of(i)), i
            assert request.text == glm_engine.decode([t for t in request.stats.token_ids if t not in glm_engine.stop_ids])
    finally:
        service.close()


@pytest.mark.parametrize("engine_fixture", ["embedded_engine", "padded_engine"])
def test_batched_greedy_equals_solo_on_the_embedded_model(engine_fixture, request):
    """On the native blocks (the embedded model's engine) and through transformers' forward (PaddedBatcher)."""
    engine = request.getfixturevalue(engine_fixture)
    service = serving(engine)
    try:
        params_of = lambda i: GenerationParams(max_new_tokens=16 + 4 * i, do_sample=False)   # noqa: E731
        requests = joined_midway(service, engine, params_of)
        for i, (reply, ids) in enumerate(zip(requests, prompts(engine))):
            assert reply.stats.token_ids == solo(engine, ids, params_of(i)), i
    finally:
        service.close()


def test_sampled_with_a_seed_is_the_same_alone_and_in_a_batch(glm_engine):
    service = serving(glm_engine)
    try:
        seeded = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.95, seed=11)
        alone = service.submit(prompt_ids=prompts(glm_engine)[2], params=seeded).result(timeout=300)
        together = joined_midway(service, glm_engine, lambda i: seeded if i == 2 else
                                 GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.0))
        assert together[2].stats.token_ids == alone.stats.token_ids
    finally:
        service.close()


def test_cancel_ends_the_reply_within_one_token_and_keeps_the_text(embedded_engine):
    service = serving(embedded_engine)
    try:
        long = GenerationParams(max_new_tokens=400, do_sample=False)
        request = service.submit([{"role": "user", "content": "Write a long story about a dragon."}], long)
        until(request, lambda r: r.stats.new_tokens >= 5)
        request.cancel()
        at_cancel = request.stats.new_tokens
        request.result(timeout=60)
        assert request.finish_reason == "stopped"
        assert request.stats.new_tokens <= at_cancel + 1 and request.text.strip()
    finally:
        service.close()


def test_a_reply_read_after_it_ended_still_comes_a_piece_a_token(embedded_engine):
    """Readers (the API's stream, the terminal chat) get the pieces as the model wrote them, however late they
    look: a fast model must not turn a stream into one lump."""
    service = serving(embedded_engine)
    try:
        request = service.submit([{"role": "user", "content": "Name three colours."}],
                                 GenerationParams(max_new_tokens=16, do_sample=False))
        request.result(timeout=120)
        deltas = list(request.deltas())
        assert "".join(deltas) == request.text and request.text.strip()
        assert len(deltas) >= request.stats.new_tokens - 1   # every token but an end token wrote text
    finally:
        service.close()


def test_queue_places_and_cancelling_a_waiting_request():
    engine = glm_core.load(str(FIXTURES / "v2"), precision="fp32")
    service = serving(engine, max_batch=1)
    try:
        ids = prompts(engine)
        slow = GenerationParams(max_new_tokens=200, do_sample=False)
        first = service.submit(prompt_ids=ids[0], params=slow)
        second = service.submit(prompt_ids=ids[1], params=GREEDY)
        third = service.submit(prompt_ids=ids[2], params=GREEDY)
        until(first, lambda r: r.status == "running")
        assert (first.place, second.place, third.place) == (0, 1, 2)
        second.cancel()
        second.result(timeout=30)
        assert second.finish_reason == "stopped" and second.stats.new_tokens == 0
        assert third.place == 1
        first.cancel()
        assert third.result(timeout=120).finish_reason in ("stop", "length")
    finally:
        service.close()


def test_a_prompt_that_cannot_fit_fails_at_once_and_a_full_queue_says_busy():
    engine = glm_core.load(str(FIXTURES / "v2"), precision="fp32")
    service = serving(engine, max_batch=1, max_waiting=1)
    try:
        with pytest.raises(PromptTooLongError):
            service.submit([{"role": "user", "content": " ".join(str(i) for i in range(2000))}])
        running = service.submit(prompt_ids=prompts(engine)[0], params=GenerationParams(max_new_tokens=400))
        until(running, lambda r: r.status == "running")
        waiting = service.submit(prompt_ids=prompts(engine)[1])
        with pytest.raises(ServiceBusy):
            service.submit(prompt_ids=prompts(engine)[2])
        running.cancel()
        waiting.cancel()
    finally:
        service.close()


def test_an_owner_with_a_running_reply_lets_others_go_first():
    engine = glm_core.load(str(FIXTURES / "v2"), precision="fp32")
    service = serving(engine, max_batch=2)
    try:
        ids, slow = prompts(engine), GenerationParams(max_new_tokens=300, do_sample=False)
        hog = [service.submit(prompt_ids=ids[0], params=slow, owner="api-key") for _ in range(3)]
        until(hog[1], lambda r: r.status == "running")
        guest = service.submit(prompt_ids=ids[1], params=GREEDY, owner="guest")
        hog[0].cancel()       # a place frees up: the guest takes it, not the key's third request
        until(guest, lambda r: r.status != "waiting")
        assert hog[2].status == "waiting"
        for r in hog:
            r.cancel()
    finally:
        service.close()


def test_a_failed_switch_puts_the_previous_model_back():
    loads = []

    def load(name, precision, device, progress=None):
        loads.append(name)
        if name == "broken":
            raise glm_core.ModelLoadError("no such model")
        return glm_core.load(str(FIXTURES / name), precision=precision)
    service = ModelService("v2", "fp32", "cpu", load=load)
    try:
        service.ensure_loading()
        hello = [{"role": "user", "content": "你好"}]
        first = service.submit(hello, GREEDY)   # waits for the start-up load
        first.result(timeout=120)
        assert service.status.name == "v2" and first.model.endswith("v2 (fp32)")
        service.load("broken", "fp32", "cpu")
        deadline = time.time() + 60
        while (service.loading or loads.count("v2") < 2) and time.time() < deadline:
            time.sleep(0.05)
        assert loads == ["v2", "broken", "v2"]
        assert service.status.state == "ready" and service.status.name == "v2"
        assert "no such model" in service.status.error and "loaded again" in service.status.error
        assert service.submit(hello, GREEDY).result(timeout=60).finish_reason in ("stop", "length")
    finally:
        service.close()


def test_forgetting_a_conversation_frees_its_kept_cache():
    engine = glm_core.load(str(FIXTURES / "v3"), precision="fp32")
    service = serving(engine)
    try:
        service.submit(prompt_ids=prompts(engine)[0], params=GREEDY, key="conv-1").result(timeout=60)
        service.submit(prompt_ids=prompts(engine)[1], params=GREEDY, key="conv-2").result(timeout=60)
        assert {k for k, _ in engine.batcher.kept} == {"conv-1", "conv-2"}
        service.forget("conv-1")
        deadline = time.time() + 10
        while len(engine.batcher.kept) > 1 and time.time() < deadline:
            time.sleep(0.02)
        assert {k for k, _ in engine.batcher.kept} == {"conv-2"}
    finally:
        service.close()
