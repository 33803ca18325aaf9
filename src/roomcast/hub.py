"""The local hub: which sockets are in which rooms on this instance; encode once, fan out.

The hub knows nothing of brokers: it reports the first member joining a room and the last one
leaving through two callbacks, and the node turns those into broker subscriptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from roomcast.protocol.socketio import encode_event_prefix
from roomcast.transport.websocket import text_frame

if TYPE_CHECKING:
    from roomcast.sockets import Socket

RoomKey = tuple[str, str]
"""(namespace, room)"""


class Hub:
    __slots__ = ("_on_first", "_on_last", "_pending", "rooms")

    def __init__(
        self, on_first_member: Callable[[RoomKey], None], on_last_member: Callable[[RoomKey], None]
    ) -> None:
        self.rooms: dict[RoomKey, set[Socket]] = {}
        self._pending: dict[RoomKey, dict[Socket, list[tuple[str, str, bytes, str]]]] = {}
        """Sockets recovering missed events: live broadcasts are held for them."""
        self._on_first = on_first_member
        self._on_last = on_last_member

    def _interested(self, key: RoomKey) -> bool:
        return key in self.rooms or key in self._pending

    def join(self, socket: Socket, key: RoomKey) -> bool:
        """Add a member; return False if it already was one."""
        members = self.rooms.get(key)
        if members is None:
            first = not self._interested(key)
            self.rooms[key] = {socket}
            if first:
                self._on_first(key)
            return True
        if socket in members:
            return False
        members.add(socket)
        return True

    def leave(self, socket: Socket, key: RoomKey) -> bool:
        members = self.rooms.get(key)
        if members is None or socket not in members:
            return False
        members.discard(socket)
        if not members:
            del self.rooms[key]
            if not self._interested(key):
                self._on_last(key)
        return True

    def hold(self, socket: Socket, key: RoomKey) -> None:
        """Start holding live broadcasts of ``key`` for a recovering socket."""
        held = self._pending.get(key)
        if held is None:
            first = not self._interested(key)
            self._pending[key] = {socket: []}
            if first:
                self._on_first(key)
        else:
            held[socket] = []

    def release(self, socket: Socket, key: RoomKey) -> list[tuple[str, str, bytes, str]]:
        """Stop holding for ``socket``; return the held (id, offset, frame, text) items."""
        held = self._pending.get(key)
        if held is None:
            return []
        items = held.pop(socket, [])
        if not held:
            del self._pending[key]
            if not self._interested(key):
                self._on_last(key)
        return items

    def broadcast(
        self,
        key: RoomKey,
        event: str,
        data: Any,
        *,
        offset: str | None = None,
        publication_id: str = "",
        exclude: str | None = None,
    ) -> int:
        """Encode the event once and write the same bytes to every member; return the count."""
        members = self.rooms.get(key)
        held = self._pending.get(key)
        if not members and not held:
            return 0
        args = [event, data, offset] if offset is not None else [event, data]
        text = encode_event_prefix(key[0]) + orjson.dumps(args).decode("utf-8")
        frame = text_frame(text.encode("utf-8"))
        sent = 0
        if members:
            if exclude is None:
                for socket in members:
                    socket.conn.send_encoded(frame, text)
                sent = len(members)
            else:
                for socket in members:
                    if socket.id != exclude:
                        socket.conn.send_encoded(frame, text)
                        sent += 1
        if held:
            for socket, items in held.items():
                if socket.id != exclude:
                    items.append((publication_id, offset or "", frame, text))
        return sent
