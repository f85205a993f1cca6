"""Who may do what, in one sentence each:

- The operator is whoever holds the operator secret (GLM_STUDIO_ADMIN_PASSWORD, or else the token the server
  prints in its terminal and writes to <data dir>/operator-token at each start): only the operator loads, switches
  or unloads models, runs or cancels benchmarks, and reads other visitors' conversations (read-only).
- Guests are everyone else, behind GLM_STUDIO_PASSWORD when it is set: they chat, and see, search, export,
  rename and delete their own conversations only.
- A visitor is who their browser's cookie says; the cookie is signed with a secret kept in the data directory
  (created once, mode 0600), so a forged or unsigned cookie is a new visitor.
- Wrong passwords are slowed down per client: after FREE_GUESSES, each try waits twice as long as the last.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from glm_core.registry import MODELS

log = logging.getLogger(__name__)

VISITOR_COOKIE = "glm_studio_visitor"
FREE_GUESSES = 3
MAX_WAIT_S = 300.0
ACTIVE_WINDOW_S = 300.0                                  # a visitor seen this recently counts as active
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def private_file(path: Path, make: bytes) -> bytes:
    """The bytes of a file only this user can read, created with `make` when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:   # copied in or loosened by hand: others may have read it, and must not from now on
            os.chmod(path, 0o600)
            log.warning("%s could be read by other users (mode %o); it is now readable by you only", path, mode)
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(make)
    return make


def models_dir() -> Path:
    return Path(os.environ.get("GLM_STUDIO_MODELS_DIR") or Path.home() / "models").expanduser().resolve()


def loadable(name: str) -> str:
    """'' when the operator may load this model name, else why not. Registry names, Hub ids (owner/name) and
    paths under the models directory may be loaded; the answer for anything else does not say whether it exists."""
    name = name.strip()
    if name in MODELS:
        return ""
    if name.startswith("remote:"):
        return ""
    if HUB_ID.fullmatch(name) and ".." not in name and not Path(name).exists():
        return ""
    path = Path(name).expanduser()
    if path.is_absolute() and models_dir() in path.resolve().parents:
        return ""
    return (f"GLM Studio loads models from its list, Hub ids (owner/name) and folders or .gguf files under "
            f"{models_dir()} (GLM_STUDIO_MODELS_DIR); {name!r} is none of these.")


class Guesses:
    """Wrong passwords per client (an address): the first FREE_GUESSES are free, then each try must wait 1 s,
    2 s, 4 s, ... (at most MAX_WAIT_S) after the last wrong one; a right password clears the count."""

    def __init__(self):
        self._wrong: dict[str, tuple[int, float]] = {}   # client -> (wrong in a row, time of the last)
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        with self._lock:
            count, last = self._wrong.get(client, (0, 0.0))
        if count < FREE_GUESSES:
            return 0.0
        return max(0.0, last + min(MAX_WAIT_S, 2.0 ** (count - FREE_GUESSES)) - time.monotonic())

    def check(self, client: str, given: str, secrets_by_role: dict[str, str]) -> tuple[str | None, float]:
        """(the role whose secret was given, or None; seconds to wait before the next try). While a wait runs,
        tries are refused unchecked."""
        wait = self.wait_s(client)
        if wait > 0:
            return None, wait
        for role, secret in secrets_by_role.items():
            if secret and hmac.compare_digest(given.encode(), secret.encode()):
                with self._lock:
                    self._wrong.pop(client, None)
                return role, 0.0
        with self._lock:
            count = self._wrong.get(client, (0, 0.0))[0] + 1
            self._wrong[client] = (count, time.monotonic())
        log.warning("wrong %s password from %s (%d in a row)", " or ".join(secrets_by_role), client, count)
        return None, self.wait_s(client)


@dataclass
class Exposure:
    address: str
    port: int
    loopback: bool
    password: bool
    visitors: int

    @property
    def warning(self) -> str:
        if self.loopback or self.password:
            return ""
        return ("Anyone who can reach this machine can use GLM Studio: no password is set. Start it with "
                "GLM_STUDIO_PASSWORD=... (or set address = \"127.0.0.1\" in .streamlit/config.toml to keep it here).")


class Access:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.secret = private_file(data_dir / "server-secret", secrets.token_bytes(32))
        self.guesses = Guesses()
        self._seen: dict[str, float] = {}
        if os.environ.get("GLM_STUDIO_ADMIN_PASSWORD"):
            self.operator_secret = os.environ["GLM_STUDIO_ADMIN_PASSWORD"]
            self.token_file: Path | None = None
        else:   # a new token each start, as Jupyter does; kept where only this user can read it
            self.operator_secret = secrets.token_urlsafe(24)
            self.token_file = data_dir / "operator-token"
            self.token_file.unlink(missing_ok=True)
            private_file(self.token_file, self.operator_secret.encode())

    @property
    def guest_password(self) -> str:
        return os.environ.get("GLM_STUDIO_PASSWORD", "")

    def operator_link(self, port: int) -> str:
        return f"http://localhost:{port}/?operator={self.operator_secret}"

    # -- visitor cookies --------------------------------------------------------------------------

    def _signature(self, visitor: str) -> str:
        return hmac.new(self.secret, visitor.encode(), hashlib.sha256).hexdigest()[:32]

    def visitor_cookie(self, visitor: str | None = None) -> tuple[str, str]:
        """(visitor id, cookie value) for a visitor, a new one when none is given."""
        visitor = visitor or secrets.token_hex(16)
        return visitor, f"{visitor}.{self._signature(visitor)}"

    def visitor_from_cookie(self, value: object) -> str | None:
        """The visitor a cookie names when its signature is this server's, else None."""
        if not isinstance(value, str) or value.count(".") != 1:
            return None
        visitor, signature = value.split(".")
        if re.fullmatch(r"[0-9a-f]{32}", visitor) and hmac.compare_digest(signature, self._signature(visitor)):
            return visitor
        return None

    # -- sign-in ----------------------------------------------------------------------------------

    def sign_in(self, client: str, given: str, operator_only: bool = False) -> tuple[str | None, float]:
        """The role a password gives ("operator" for the operator's secret, "guest" for the access password),
        or None and the seconds this client must wait before trying again."""
        roles = {"operator": self.operator_secret}
        if not operator_only:
            roles["guest"] = self.guest_password
        return self.guesses.check(client, given, roles)

    # -- who is here ------------------------------------------------------------------------------

    def seen(self, visitor: str) -> None:
        self._seen[visitor] = time.monotonic()

    def exposure(self, address: str, port: int) -> Exposure:
        now = time.monotonic()
        visitors = sum(1 for t in list(self._seen.values()) if now - t < ACTIVE_WINDOW_S)
        try:
            loopback = ip_address(address).is_loopback
        except ValueError:
            loopback = address == "localhost"
        return Exposure(address, port, loopback, bool(self.guest_password), visitors)
