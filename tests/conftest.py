import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def throwaway_dir(prefix: str) -> str:
    """A temporary directory for this run, removed when the run ends (a run's cache holds the dequantized embedded
    model, half a GB: left behind, runs filled the disk)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The app under test keeps its history in a throwaway file, never in the user's real database.
os.environ["GLM_STUDIO_DB"] = str(Path(throwaway_dir("glm-studio-test-")) / "history.db")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GLM_STUDIO_FIXTURES", ROOT.parent / "shared" / "fixtures"))
# The fixture checkpoints are the models the operator may load from a path (GLM_STUDIO_MODELS_DIR).
os.environ["GLM_STUDIO_MODELS_DIR"] = str(FIXTURES)
# One cache for the run and the servers it starts (the embedded model is dequantized once), not the user's.
if "GLM_STUDIO_CACHE" not in os.environ:
    os.environ["GLM_STUDIO_CACHE"] = throwaway_dir("glm-studio-cache-")


def _native_library_builds() -> bool:
    from glm_core import native
    return native.wanted() and native.compiler_path() is not None


# glm_core.native's kernel library (its AVX2 products, GGUF products, decode attention, RMSNorm's scaling, the Llama
# decode layers) builds on every CPU with AVX2 where a C compiler is found; the AVX2-path products also need torch on
# that path (test_quant's needs_native).
needs_native_library = pytest.mark.skipif(
    not _native_library_builds(), reason="glm_core.native's kernels build where the CPU has AVX2, with a C compiler")


@pytest.fixture(scope="session")
def embedded_engine():
    """The real embedded SmolLM2, loaded once for the whole run (fp32: deterministic greedy ids)."""
    import glm_core
    return glm_core.load(glm_core.EMBEDDED, precision="fp32")


@pytest.fixture(scope="session")
def padded_engine():
    """The embedded model through transformers' own forward (batch.PaddedBatcher), as models the native blocks do not
    run go: the engine's other path, on the same real model."""
    import glm_core
    from glm_core.engines import load_transformers
    return load_transformers(glm_core.EMBEDDED, precision="fp32", native_blocks=False)


@pytest.fixture
def store():
    """The same store the app under test writes to (the process-wide one)."""
    from app import runtime
    return runtime.store()


@pytest.fixture(scope="module")
def one_thread():
    """The fixture models are tiny: a second thread only adds synchronisation, which stalls on a busy machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test leaves screenshots of its latest pages in test-artifacts/: a timeout says too little."""
    report = (yield).get_result()
    chromium = getattr(item, "funcargs", {}).get("chromium")
    if report.when != "call" or not report.failed or chromium is None:
        return
    from e2e import ARTIFACTS
    ARTIFACTS.mkdir(exist_ok=True)
    for i, context in enumerate(chromium.contexts[-3:]):
        for j, page in enumerate(context.pages):
            try:
                page.screenshot(path=str(ARTIFACTS / f"failed-{item.name}-{i}-{j}.png"), full_page=True)
            except Exception as e:  # noqa: BLE001 - a page that cannot be drawn: the report says so, the failure stands
                report.sections.append(("screenshot", f"page {i}-{j}: {e}"))
