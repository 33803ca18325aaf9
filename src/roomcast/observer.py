"""What watches sockets: the Admin UI's recorder (``roomcast.admin.tap.Tap``) implements it.

The socket server holds one only while someone watches (``SocketServer.observer``); otherwise
each place that would tell it costs one attribute test.  Nothing here runs per broadcast
member.  Generic in the socket type, so that this module needs nothing of
:mod:`roomcast.socket`, which calls it.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

__all__ = ["Observer"]

S_contra = TypeVar("S_contra", contravariant=True)


class Observer(Protocol[S_contra]):
    def connected(self, socket: S_contra) -> None:
        """The socket connected (a recovered one: with the rooms it recovered)."""
        ...

    def disconnected(self, socket: S_contra, reason: str, rooms: set[str]) -> None:
        """The socket closed, leaving ``rooms``."""
        ...

    def joined(self, socket: S_contra, room: str) -> None: ...

    def left(self, socket: S_contra, room: str) -> None: ...

    def received(self, socket: S_contra, data: list[Any]) -> None:
        """A client event (name and arguments)."""
        ...

    def sent(self, socket: S_contra, data: list[Any]) -> None:
        """An event sent to this socket alone (name and arguments)."""
        ...
