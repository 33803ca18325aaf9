"""Topics: how brokers name a room of a Socket.IO namespace.

Every namespace has its own rooms, as in Socket.IO: room ``1`` of ``/docs`` and room ``1`` of
``/`` are different rooms.  A broker subscribes, stores and replays *topics*: a room of the main
namespace is the topic of the same name (so the keys of existing rooms are unchanged), and room
``r`` of namespace ``/n`` is the topic ``/n#r``.  Room names never contain ``#`` (see
:func:`roomcast.auth.validate_room`), so no topic of one namespace is a topic of another.
"""

from __future__ import annotations

import re
from typing import Final

from roomcast.auth import validate_room

__all__ = [
    "MAIN",
    "NAMESPACE_MAX_LENGTH",
    "InvalidNamespaceError",
    "split_topic",
    "topic",
    "validate_namespace",
    "validate_topic",
]

MAIN: Final = "/"
NAMESPACE_MAX_LENGTH: Final = 64
_NAMESPACE_RE: Final = re.compile(r"\A/(?:[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*)?\Z")


class InvalidNamespaceError(ValueError):
    """A namespace name that is not ``/`` followed by ``/``-separated words."""


def validate_namespace(namespace: object) -> str:
    """Return ``namespace`` if it is a valid namespace name, else raise
    :class:`InvalidNamespaceError`: ``/``, or ``/`` and words of letters, digits and ``_.-``
    separated by ``/`` (at most 64 characters)."""
    if not isinstance(namespace, str):
        raise InvalidNamespaceError(
            f"invalid namespace {namespace!r:.60}: must be a string, got {type(namespace).__name__}"
        )
    if len(namespace) > NAMESPACE_MAX_LENGTH or _NAMESPACE_RE.match(namespace) is None:
        raise InvalidNamespaceError(
            f"invalid namespace {namespace!r:.70}: '/' then words of letters, digits and '_.-' "
            f"separated by '/', at most {NAMESPACE_MAX_LENGTH} characters"
        )
    return namespace


def topic(namespace: str, room: str) -> str:
    """The topic of ``room`` in ``namespace`` (both already valid)."""
    return room if namespace == MAIN else f"{namespace}#{room}"


def split_topic(name: str) -> tuple[str, str]:
    """``(namespace, room)`` of a topic (not validated)."""
    namespace, sep, room = name.partition("#")
    return (namespace, room) if sep else (MAIN, name)


def validate_topic(name: str) -> str:
    """Return ``name`` if it is the topic of a valid room of a valid namespace; raise
    :class:`InvalidNamespaceError` or :class:`~roomcast.auth.InvalidRoomError` (both
    ``ValueError``) otherwise."""
    namespace, room = split_topic(name)
    validate_room(room)
    if name != topic(validate_namespace(namespace), room):  # "/#room" names "room"
        raise InvalidNamespaceError(f"invalid topic {name!r:.70}: the main namespace has no '#'")
    return name
