"""Revoked users and token ids, checked at connect and on refresh without a round trip.

A revocation names a user (every token of that user issued before the revocation is refused)
or a token id (``jti``; refused until the token's ``exp``).  Each instance keeps the revocations
in memory; the broker stores them (Redis: the sorted set ``<prefix>:revocations``, each entry
scored by when it may be forgotten) so that an instance that starts, or missed the broadcast
of a revocation, loads them (:meth:`Revocations.load`, every few seconds).

Entries, as stored: ``u:<revoked at, ms>:<user>`` and ``j:<jti>``.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from roomcast.auth import AuthError, Principal

_RECENT_S = 60.0

__all__ = ["Revocations", "TokenRevokedError", "jti_entry", "user_entry"]

log = logging.getLogger("roomcast.auth")


class TokenRevokedError(AuthError):
    """The token, or every token of its user issued before a moment, was revoked."""

    code: ClassVar[str] = "token_revoked"


def user_entry(user: str, revoked_at_ms: int) -> str:
    return f"u:{revoked_at_ms}:{user}"


def jti_entry(jti: str) -> str:
    return f"j:{jti}"


class Revocations:
    """The revocations this instance knows of."""

    def __init__(self) -> None:
        self._users: dict[str, int] = {}
        """User -> the latest revocation (ms): tokens issued before it are refused."""
        self._jtis: set[str] = set()
        self._recent: dict[str, float] = {}
        """Entries learnt here (a broadcast, this instance's own revoke) and when (monotonic):
        a reload whose read was issued before they were stored must not forget them."""

    def __len__(self) -> int:
        return len(self._users) + len(self._jtis)

    def learn(self, entry: str) -> None:
        """Take an entry as it is announced, before a reload can see it stored."""
        self._recent[entry] = time.monotonic()
        self.add(entry)

    def add(self, entry: str) -> None:
        """Take one stored entry; a malformed one is logged and ignored."""
        kind, _, rest = entry.partition(":")
        if kind == "j" and rest:
            self._jtis.add(rest)
            return
        at, _, user = rest.partition(":")
        if kind == "u" and at.isdigit() and user:
            if int(at) > self._users.get(user, -1):
                self._users[user] = int(at)
            return
        log.warning("ignored a malformed revocation entry %r", entry[:80])

    def load(self, entries: list[str]) -> None:
        """Replace what is known by what the broker holds (expired entries are gone there),
        keeping what was learnt in the last minute (the read may predate its storing)."""
        self._users.clear()
        self._jtis.clear()
        for entry in entries:
            self.add(entry)
        since = time.monotonic() - _RECENT_S
        for entry, learnt in list(self._recent.items()):
            if learnt < since:
                del self._recent[entry]
            else:
                self.add(entry)

    def check(self, principal: Principal) -> None:
        """Raise :class:`TokenRevokedError` if ``principal``'s token is revoked."""
        if not self._users and not self._jtis:
            return
        jti = principal.claims.get("jti")
        if isinstance(jti, str) and jti in self._jtis:
            raise TokenRevokedError("token revoked")
        revoked_at = self._users.get(principal.user_id)
        if revoked_at is not None:
            iat = principal.claims.get("iat")
            # A token without iat may predate the revocation: refused too.
            if not isinstance(iat, int | float) or iat * 1000 <= revoked_at:
                raise TokenRevokedError("token revoked: the user's tokens were revoked")

    def matches(self, principal: Principal, entry: str) -> bool:
        """Whether the revocation ``entry`` revokes ``principal``'s token."""
        probe = Revocations()
        probe.add(entry)
        try:
            probe.check(principal)
        except TokenRevokedError:
            return True
        return False


def now_ms() -> int:
    return int(time.time() * 1000)
