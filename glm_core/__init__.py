"""glm_core: ChatGLM (v1, v2, v3) in plain PyTorch, plus any transformers chat model, behind one Engine."""
from __future__ import annotations

import json
from pathlib import Path

from .engines import REMOTE, Engine, ModelLoadError, Progress, load_glm, load_remote, load_transformers
from .generate import GenerationParams, PromptTooLongError, ReplyStats
from .registry import EMBEDDED, MODELS, PRECISIONS

DEVICES = ("cpu", "cuda", "mps")

__all__ = ["load", "Engine", "GenerationParams", "ReplyStats", "ModelLoadError", "PromptTooLongError",
           "EMBEDDED", "MODELS", "PRECISIONS"]


def is_chatglm_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "chatglm"
    except (OSError, json.JSONDecodeError):
        return False


def load(path_or_name: str, precision: str = "bf16", device: str = "cpu",
         progress: Progress | None = None, exact: bool = False, api_key: str = "") -> Engine:
    """Load a registry name, a local directory, a .gguf file or a Hub id at a precision on a device, or name
    another server's model: remote:BASE_URL#MODEL (with its api_key; precision and device are the server's).
    exact: int8/int4 layers take unrounded inputs, the official arithmetic (slow on CPU: for checking)."""
    if path_or_name.startswith(REMOTE):
        return load_remote(path_or_name, api_key)
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device.split(":")[0] not in DEVICES:
        raise ModelLoadError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    known = MODELS.get(path_or_name)
    if known is not None and known.family.startswith("chatglm"):
        return load_glm(path_or_name, known.source, precision, device, progress, exact)
    path = Path(path_or_name).expanduser()
    if path.is_dir() and is_chatglm_dir(path):
        return load_glm(path_or_name, str(path), precision, device, progress, exact)
    if not path.exists() and "chatglm" in path_or_name.lower():
        return load_glm(path_or_name, path_or_name, precision, device, progress, exact)   # a ChatGLM Hub id
    return load_transformers(path_or_name, precision, device, progress, exact)
