"""Reading a conversations export that someone uploads, before any of it is written.

`read_export` refuses text over the size limit before parsing it, parses it safely, and checks every
field of the whole document. It returns the rows to insert, or raises InvalidImport with a message
for the user that says where the problem is ("conversation 3, message 7: content must be text").
Every field an export has is required, and a field it does not have is refused: a misspelt field
would otherwise be dropped without a word. A newer export format comes with a new EXPORT_VERSION.
"""

import json
import os
import re
from datetime import datetime
from typing import Callable

from .schema import EXPORT_FORMAT, EXPORT_VERSION, FINISH_REASONS, MESSAGE_STATS, ROLES

MAX_IMPORT_BYTES = 20 * 1024 * 1024  # $GLM_STUDIO_MAX_IMPORT_MB overrides it
TEXT_LIMITS = {"title": 1_000, "model": 200, "precision": 50, "system_prompt": 100_000}
CONTENT_LIMIT = 1_000_000
ERROR_LIMIT = 100_000
STAT_LIMIT = 10**9  # tokens, seconds and tokens per second
WHOLE_STATS = ("prompt_tokens", "new_tokens")
CONVERSATION_KEYS = ("id", *TEXT_LIMITS, "params", "created_at", "updated_at", "messages")
MESSAGE_KEYS = ("role", "content", "finish_reason", "error", *MESSAGE_STATS, "stats", "created_at", "updated_at")
ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")  # ids end up in URLs

Conversation = tuple[dict, list[dict]]  # a conversations row and its messages rows, owner and ids left to fill


class InvalidImport(ValueError):
    """An import refused before anything was written; the message tells the user what is wrong and where."""


def max_import_bytes() -> int:
    """MAX_IMPORT_BYTES, or $GLM_STUDIO_MAX_IMPORT_MB megabytes when set (read at each import)."""
    mb = os.environ.get("GLM_STUDIO_MAX_IMPORT_MB")
    if not mb:
        return MAX_IMPORT_BYTES
    try:
        return int(float(mb) * 1024 * 1024)
    except (ValueError, OverflowError):
        raise ValueError(f"GLM_STUDIO_MAX_IMPORT_MB must be a number of megabytes, got {mb!r}") from None


def any_object(params: object) -> dict:
    """The default check of a conversation's params: any JSON object."""
    if not isinstance(params, dict):
        raise ValueError(f"must be an object of named values, not {type(params).__name__}")
    return params


def read_export(data: dict | str | bytes, validate_params: Callable[[object], dict],
                max_bytes: int) -> list[Conversation]:
    """The conversations of an export (a dict, or JSON text of at most `max_bytes` bytes), checked
    through and through; `validate_params(obj) -> dict` checks each conversation's params."""
    doc = data if isinstance(data, dict) else parse(data, max_bytes)
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise InvalidImport("this is not a GLM Studio conversations export")
    if doc.get("version") != EXPORT_VERSION:
        raise InvalidImport(f"unsupported export version {shown(doc.get('version'))}; "
                            f"this GLM Studio reads version {EXPORT_VERSION}")
    check_keys(doc, ("format", "version", "conversations"), "the export")
    if not isinstance(doc["conversations"], list):
        raise InvalidImport("the export: conversations must be a list")
    return [conversation(conv, validate_params, f"conversation {n}") for n, conv in enumerate(doc["conversations"], 1)]


def parse(data: str | bytes, max_bytes: int) -> object:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > max_bytes:
        raise InvalidImport(f"the file is too big to import: {len(data):,} bytes, "
                            f"the limit is {max_bytes:,} ({max_bytes / 2**20:.1f} MB)")
    try:
        text = data.decode("utf-8-sig")  # a byte order mark, as some editors write, is fine
    except UnicodeDecodeError as e:
        raise InvalidImport(f"the file is not UTF-8 text (at byte {e.start:,})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidImport(f"the file is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise InvalidImport("the file is not a GLM Studio export: its JSON is nested too deeply") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise InvalidImport("the file is not a GLM Studio export: it has a number too long to read") from None


def conversation(conv: object, validate_params: Callable[[object], dict], where: str) -> Conversation:
    check_keys(conv, CONVERSATION_KEYS, where)
    if not isinstance(conv["id"], str) or not ID_PATTERN.fullmatch(conv["id"]):
        raise InvalidImport(f"{where}: id must be 1 to 64 letters, digits, - or _")
    try:
        params = json.dumps(validate_params(conv["params"]), allow_nan=False)
    except (ValueError, RecursionError) as e:
        raise InvalidImport(f"{where}: params: {e}"[:500]) from None
    if not isinstance(conv["messages"], list):
        raise InvalidImport(f"{where}: messages must be a list")
    row = {"id": conv["id"], **{key: text(conv[key], limit, f"{where}: {key}") for key, limit in TEXT_LIMITS.items()},
           "params": params, "created_at": timestamp(conv["created_at"], f"{where}: created_at"),
           "updated_at": timestamp(conv["updated_at"], f"{where}: updated_at")}
    return row, [message(m, f"{where}, message {n}") for n, m in enumerate(conv["messages"], 1)]


def message(m: object, where: str) -> dict:
    check_keys(m, MESSAGE_KEYS, where)
    if m["role"] not in ROLES:
        raise InvalidImport(f"{where}: role must be one of {', '.join(ROLES)}, not {shown(m['role'])}")
    if m["finish_reason"] is not None and m["finish_reason"] not in FINISH_REASONS:
        raise InvalidImport(f"{where}: finish_reason must be one of {', '.join(FINISH_REASONS)} or null, "
                            f"not {shown(m['finish_reason'])}")
    return {"role": m["role"], "content": text(m["content"], CONTENT_LIMIT, f"{where}: content"),
            "finish_reason": m["finish_reason"],
            "error": None if m["error"] is None else text(m["error"], ERROR_LIMIT, f"{where}: error"),
            **{key: m[key] if m[key] is None else number(key, m[key], f"{where}: {key}") for key in MESSAGE_STATS},
            "stats": stats_json(m["stats"], f"{where}: stats"),
            "created_at": timestamp(m["created_at"], f"{where}: created_at"),
            "updated_at": timestamp(m["updated_at"], f"{where}: updated_at")}


def check_keys(obj: object, keys: tuple[str, ...], where: str):
    if not isinstance(obj, dict):
        raise InvalidImport(f"{where} must be an object")
    missing = [key for key in keys if key not in obj]
    if missing:
        raise InvalidImport(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(str(key) for key in obj if key not in keys)
    if unknown:
        raise InvalidImport(f"{where}: unknown field(s) {', '.join(unknown)}"[:500])


def text(value: object, limit: int, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidImport(f"{where} must be text")
    if len(value) > limit:
        raise InvalidImport(f"{where} is longer than {limit:,} characters")
    try:
        value.encode()
    except UnicodeEncodeError:  # an unpaired surrogate ("\ud800"): valid JSON, but no Unicode text
        raise InvalidImport(f"{where} is not valid Unicode text") from None
    return value


def timestamp(value: object, where: str) -> str:
    if isinstance(value, str) and len(value) <= 40:
        try:
            datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise InvalidImport(f"{where} must be a date and time such as 2024-05-01T10:00:00.000+00:00")


def stats_json(stats: object, where: str) -> str | None:
    """A message's stats: an object of numbers (in range, as their columns), short text, true/false or null."""
    if stats is None:
        return None
    if not isinstance(stats, dict):
        raise InvalidImport(f"{where} must be an object or null")
    for key, value in stats.items():
        if len(str(key)) > 100:
            raise InvalidImport(f"{where}: a name is longer than 100 characters")
        if isinstance(value, str):
            text(value, 1_000, f"{where}: {key}")
        elif value is not None and not isinstance(value, bool):
            number(key, value, f"{where}: {key}")
    return json.dumps(stats)


def number(key: str, value: object, where: str) -> int | float:
    kind = int if key in WHOLE_STATS else (int, float)
    # NaN fails the range test as well as infinity; huge integers are refused here, before SQLite.
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 <= value <= STAT_LIMIT:
        raise InvalidImport(f"{where} must be {'a whole number' if kind is int else 'a number'} "
                            f"from 0 to {STAT_LIMIT:,} or null, not {shown(value)}")
    return value


def shown(value: object) -> str:
    """A value quoted in an error message, cut short."""
    r = repr(value)
    return r if len(r) <= 40 else r[:40] + "…"
