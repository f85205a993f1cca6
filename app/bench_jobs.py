"""Benchmarks in the background: one run at a time, started and cancelled by the operator only, results saved as
they come. Each precision's measurement holds the model service (replies in progress finish first, new ones
wait), so a measurement never competes with a chat for the cores."""
from __future__ import annotations

import dataclasses
import threading

from glm_core import bench
from glm_core.service import ModelService
from storage import Store


class BenchBusy(RuntimeError):
    """A benchmark is already running."""


class BenchJob:
    def __init__(self, spec: bench.BenchSpec, store: Store, models: ModelService):
        self.spec = spec
        self.cancel = threading.Event()
        self.progress = {"done": 0, "total": 1, "label": "starting", "eta_s": None}
        self.results: list[dict] = []
        self.error = ""
        self.run_id = store.create_bench_run(bench.machine_info(measure_bandwidth=False), dataclasses.asdict(spec))

        def on_event(event: dict) -> None:
            if event["type"] == "progress":
                self.progress = event
            else:
                self.results.append(event["result"])
                store.add_bench_result(self.run_id, event["result"])

        def work() -> None:
            status = "error"
            try:
                report = bench.run(spec, on_event, self.cancel, turn=lambda: models.hold("a benchmark"))
                status = "stopped" if report["cancelled"] else "done"
            except Exception as e:  # noqa: BLE001 - shown on the page, kept with the run
                self.error = f"{type(e).__name__}: {e}"
            finally:
                store.finish_bench_run(self.run_id, status)

        self.thread = threading.Thread(target=work, name=f"bench-{self.run_id}", daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()


class BenchJobs:
    def __init__(self, store: Store, models: ModelService):
        self.store, self.models = store, models
        self.job: BenchJob | None = None
        self._lock = threading.Lock()

    def start(self, spec: bench.BenchSpec, operator: bool) -> BenchJob:
        """Start a run (operator only; one at a time). Checks the spec, and the free disk for random weights,
        first: bench.BenchError says what is wrong."""
        if not operator:
            raise PermissionError("only the operator runs benchmarks")
        bench.check_spec(spec)
        with self._lock:
            if self.job is not None and self.job.running:
                raise BenchBusy(f"run #{self.job.run_id} is still running; cancel it or wait for it")
            self.job = BenchJob(spec, self.store, self.models)
            return self.job

    def cancel(self, operator: bool) -> None:
        if not operator:
            raise PermissionError("only the operator cancels benchmarks")
        if self.job is not None:
            self.job.cancel.set()
