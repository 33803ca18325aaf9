"""Every Redis key and channel name Roomcast uses, in one place.

Keys that belong to one room carry the room as the Redis Cluster hash tag (``{<room>}``), so a
room's stream and its idempotency keys live in one slot and one Lua script may touch them all.
Room names never contain braces (see :func:`roomcast.auth.validate_room`), and neither may the
prefix, so the first ``{...}`` of a key is always the room.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["KeyNameError", "Keys", "keyspace_channel"]

_PREFIX_RE: Final = re.compile(r"\A[A-Za-z0-9:_.@/-]{1,64}\Z")


class KeyNameError(ValueError):
    """A prefix or key part that would break the key layout."""


def keyspace_channel(db: int, key: str) -> str:
    """The keyspace-notification channel of ``key`` in database ``db``."""
    return f"__keyspace@{db}__:{key}"


class Keys:
    """Key names under one prefix (default ``roomcast``)."""

    __slots__ = ("_upstream", "prefix")

    def __init__(self, prefix: str = "roomcast", *, upstream: str | None = None) -> None:
        if _PREFIX_RE.match(prefix) is None:
            raise KeyNameError(
                f"invalid prefix {prefix[:70]!r}: 1-64 letters, digits and ':_-.@/' "
                "(no braces: they would change the cluster hash tag)"
            )
        if upstream is not None and not upstream:
            raise KeyNameError("invalid upstream stream name '': must not be empty")
        self.prefix = prefix
        self._upstream = upstream

    def room(self, room: str) -> str:
        """The room's stream of publications: ``<prefix>:room:{<room>}``."""
        return f"{self.prefix}:room:{{{room}}}"

    def idempotency(self, room: str, key: str) -> str:
        """The idempotency record of ``key`` in ``room``: ``<prefix>:idem:{<room>}:<key>``.

        Its value is ``<publication id>|<stream entry id>`` of the entry that claimed the key.
        """
        return f"{self.prefix}:idem:{{{room}}}:{key}"

    def feed(self, room: str, db: int) -> str:
        """The room's feed channel in database ``db``: ``<prefix>:feed:<db>:{<room>}``.

        On a single Redis server, every publish through Roomcast also publishes its entry here,
        with the id of the entry before it, so a subscribed instance that delivered that entry
        can deliver this one without reading the stream.  Pub/sub channels are shared by all
        databases of a server, hence the database number (as in keyspace channels).
        """
        return f"{self.prefix}:feed:{db}:{{{room}}}"

    def session(self, pid: str) -> str:
        """A disconnected socket's recovery state: ``<prefix>:session:{<pid>}``."""
        if "{" in pid or "}" in pid:
            raise KeyNameError(f"invalid session id {pid[:70]!r}: must not contain braces")
        return f"{self.prefix}:session:{{{pid}}}"

    def upstream(self) -> str:
        """The stream of client events for backend services (``<prefix>:upstream``)."""
        return self._upstream if self._upstream is not None else f"{self.prefix}:upstream"

    def control(self, instance: str | None = None) -> str:
        """The pub/sub channel of control messages to every instance (``<prefix>:control``),
        or to one instance (``<prefix>:control:<instance>``)."""
        base = f"{self.prefix}:control"
        return base if instance is None else f"{base}:{instance}"

    def revocations(self) -> str:
        """The sorted set of revocation entries, scored by when each may be forgotten (ms)."""
        return f"{self.prefix}:revocations"

    def user_connects(self, user: str) -> str:
        """New connections of ``user`` in the current window: ``<prefix>:connects:{<user>}``."""
        return f"{self.prefix}:connects:{{{user}}}"

    def user_held(self, user: str) -> str:
        """The sorted set of ``user``'s open connections, scored by when each may be forgotten
        (ms): ``<prefix>:held:{<user>}``, in the slot of :meth:`user_connects`."""
        return f"{self.prefix}:held:{{{user}}}"

    def instances(self) -> str:
        """The sorted set of live instances, scored by when each last said so (ms)."""
        return f"{self.prefix}:instances"

    def probe(self, tag: str) -> str:
        """A short-lived stream used to check that keyspace notifications reach us."""
        return f"{self.prefix}:probe:{{{tag}}}"
