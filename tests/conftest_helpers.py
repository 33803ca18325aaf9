"""Token helpers shared by in-process tests."""

from __future__ import annotations

from roomcast.auth import Authenticator, AuthSettings
from wire import SECRET

_AUTH = Authenticator(AuthSettings(secret=SECRET))


def token_for(
    *rooms: str, publish: tuple[str, ...] = (), user: str = "alice", ttl: int = 600
) -> str:
    return _AUTH.mint(user, list(rooms), list(publish), ttl_seconds=ttl)
