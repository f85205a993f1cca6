"""The model's thread count follows the other processes' load; the service's worker is where it is set."""
import os
import subprocess
import sys
import time

import pytest
import torch

from glm_core.threads import Sample, ThreadPolicy, busy_cores_to_leave, sample


def test_cores_are_left_to_others_with_a_margin_each_way():
    assert busy_cores_to_leave(0.0, 0) == 0
    assert busy_cores_to_leave(0.5, 0) == 0      # a browser drawing now and then: keep every core
    assert busy_cores_to_leave(0.7, 0) == 1      # a process on most of a core
    assert busy_cores_to_leave(0.5, 1) == 1      # between the two margins: no flapping
    assert busy_cores_to_leave(0.2, 1) == 0      # it went away: take the core back
    assert busy_cores_to_leave(1.8, 0) == 2


def test_the_policy_counts_only_other_processes_and_keeps_one_thread():
    policy = ThreadPolicy(cores=2)
    policy.observe(Sample(at=0.0, busy=0.0, own=0.0))
    policy.observe(Sample(at=1.0, busy=1.9, own=1.9))    # all of it ours: both cores stay ours
    assert policy.threads == 2 and policy.others == pytest.approx(0.0)
    policy.observe(Sample(at=2.0, busy=3.9, own=2.9))    # another process took one core
    assert policy.threads == 1 and policy.others == pytest.approx(1.0)
    policy.observe(Sample(at=3.0, busy=6.0, own=3.9))    # others on more cores than there are: one thread stays
    assert policy.threads == 1
    policy.observe(Sample(at=4.0, busy=7.9, own=5.8))
    assert policy.threads == 2


def test_a_fixed_count_from_the_environment(monkeypatch, restore_threads):
    monkeypatch.setenv("GLM_STUDIO_THREADS", "1")
    policy = ThreadPolicy(cores=2)
    policy.observe(Sample(at=0.0, busy=0.0, own=0.0))
    assert policy.update() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("GLM_STUDIO_THREADS", "many")
    assert ThreadPolicy(cores=2).fixed is None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores: one for the spinning process, one for us")
def test_a_process_spinning_on_a_core_takes_a_thread_away(restore_threads):
    policy = ThreadPolicy(cores=2)
    policy.update()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)   # it starts
        policy.observe(sample())
        time.sleep(1.5)
        policy.observe(sample())
    finally:
        spinner.kill()
        spinner.wait()
    assert policy.others >= 0.6, f"a spinning process showed as {policy.others:.2f} cores"
    assert policy.threads == policy.cores - 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_service_sets_the_count_in_its_worker_thread(restore_threads):
    from test_service import GREEDY, serving
    import glm_core
    from conftest import FIXTURES
    engine = glm_core.load(str(FIXTURES / "v2"), precision="fp32")
    service = serving(engine)
    try:
        service.threads = ThreadPolicy(cores=2, fixed=1)
        torch.set_num_threads(2)
        reply = service.submit(prompt_ids=engine.prompt_ids([{"role": "user", "content": "hi"}]), params=GREEDY)
        assert reply.result(timeout=120).error == ""
        assert service.call(torch.get_num_threads).result(timeout=30) == 1   # the worker's own setting
        assert torch.get_num_threads() == 2                                    # not this thread's
        with pytest.raises(ZeroDivisionError):
            service.call(lambda: 1 / 0).result(timeout=30)
    finally:
        service.close()
    assert service.call(lambda: 1).cancelled()
