import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def embedded_engine():
    """The real embedded SmolLM2, loaded once for the whole run (fp32: deterministic greedy ids)."""
    import glm_core
    return glm_core.load(glm_core.EMBEDDED, precision="fp32")
