"""The Admin UI's login: a user name and a bcrypt-hashed password, then a session id.

The UI sends ``{username, password}`` in the CONNECT auth of the admin namespace; a match gets
a fresh session id (the ``session`` event), which the UI keeps and sends instead, as
``{sessionId}``, every time it connects again (a reload, a reconnection).  Anything else is
refused with ``invalid credentials``, the message the UI answers with its login form.

Sessions are kept as SHA-256 digests (so the store holds no usable credential) with an expiry,
at most :data:`MAX_SESSIONS` of them (the oldest go first), and are shared with the other
instances over the control channel by the caller (:meth:`AdminAuth.remember`).

bcrypt is slow on purpose (about 0.25 s at cost 12): it runs in a worker thread, at most
:data:`CONCURRENT_CHECKS` at a time, and a login that would wait behind more than
:data:`MAX_WAITING` others is refused at once, so a flood of attempts costs the event loop
nothing and the threads a bounded amount.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import bcrypt

__all__ = ["AdminAuth", "Login", "LoginRefusedError", "session_digest"]

MAX_SESSIONS: Final = 1000
SESSION_TTL_S: Final = 24 * 3600.0
CONCURRENT_CHECKS: Final = 2
MAX_WAITING: Final = 16
MAX_PASSWORD_BYTES: Final = 72
"""bcrypt reads at most 72 bytes; a longer password cannot have been hashed (bcrypt 5 refuses)."""
INVALID: Final = "invalid credentials"
"""The refusal's message: the UI shows its login form again for exactly this one."""


class LoginRefusedError(Exception):
    """The CONNECT is refused; ``code`` says why (``invalid_credentials`` or ``busy``)."""

    def __init__(self, code: str, message: str = INVALID) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Login:
    """An accepted login: ``session`` is a new session id to give the UI, or ``None`` when
    it came with a session id that is still valid."""

    session: str | None


def session_digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class AdminAuth:
    def __init__(
        self,
        username: str,
        password_hash: str,
        *,
        max_sessions: int = MAX_SESSIONS,
        session_ttl_s: float = SESSION_TTL_S,
    ) -> None:
        self._username = username.encode()
        self._hash = password_hash.encode()
        self._max_sessions = max_sessions
        self.session_ttl_s = session_ttl_s
        self._sessions: OrderedDict[str, float] = OrderedDict()
        """Session digest -> expiry (``time.time()``), oldest first."""
        self._checks = asyncio.Semaphore(CONCURRENT_CHECKS)
        self._waiting = 0

    def __len__(self) -> int:
        return len(self._sessions)

    async def login(self, auth: dict[str, Any]) -> Login:
        """Check a CONNECT auth payload; raise :class:`LoginRefusedError` to refuse it."""
        session_id = auth.get("sessionId")
        if isinstance(session_id, str) and session_id and self.valid(session_id):
            return Login(None)
        username, password = auth.get("username"), auth.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise LoginRefusedError("invalid_credentials")
        if self._waiting >= MAX_WAITING:
            raise LoginRefusedError("busy", "too many login attempts, try again later")
        self._waiting += 1
        try:
            async with self._checks:
                matched = await asyncio.to_thread(self._check, username, password)
        finally:
            self._waiting -= 1
        if not matched:
            raise LoginRefusedError("invalid_credentials")
        session_id = secrets.token_urlsafe(24)
        self.remember(session_digest(session_id), time.time() + self.session_ttl_s)
        return Login(session_id)

    def _check(self, username: str, password: str) -> bool:
        """In a worker thread: the name (constant time) and the password (bcrypt, always run,
        so a wrong name takes as long as a wrong password)."""
        secret = password.encode()
        if len(secret) > MAX_PASSWORD_BYTES:
            secret = b""  # cannot match; still pay for one check
        password_ok = bcrypt.checkpw(secret, self._hash)
        return hmac.compare_digest(username.encode(), self._username) and password_ok

    def valid(self, session_id: str) -> bool:
        digest = session_digest(session_id)
        expiry = self._sessions.get(digest)
        if expiry is None:
            return False
        if expiry <= time.time():
            del self._sessions[digest]
            return False
        return True

    def remember(self, digest: str, until: float) -> None:
        """Know of a session (made here, or by another instance) until ``until``."""
        if until <= time.time():
            return
        self._sessions[digest] = until
        self._sessions.move_to_end(digest)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
