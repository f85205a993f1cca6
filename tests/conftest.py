import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The app under test keeps its history in a throwaway file, never in the user's real database.
os.environ["GLM_STUDIO_DB"] = str(Path(tempfile.mkdtemp(prefix="glm-studio-test-")) / "history.db")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("GLM_STUDIO_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def embedded_engine():
    """The real embedded SmolLM2, loaded once for the whole run (fp32: deterministic greedy ids)."""
    import glm_core
    return glm_core.load(glm_core.EMBEDDED, precision="fp32")


@pytest.fixture
def store():
    """The same SQLite file the app under test writes to."""
    from storage import open_store
    s = open_store()
    yield s
    s.close()
