"""The local hub: which sockets are in which rooms on this instance; encode once, fan out.

The hub knows nothing of brokers: it reports the first member joining a room and the last one
leaving through two callbacks, and the node turns those into broker subscriptions.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from roomcast.broker.offsets import parse_offset
from roomcast.connection import PollingText
from roomcast.protocol.engineio import SEPARATOR
from roomcast.protocol.parser import Parser
from roomcast.protocol.socketio import JSON_PARSER, Packet, PacketType, encode_event_prefix
from roomcast.transport.websocket import binary_frame, text_frame

if TYPE_CHECKING:
    from roomcast.connection import Connection, Flusher


class Member(Hashable, Protocol):
    """What the hub needs of a room member (a Socket.IO socket): its id and its connection."""

    @property
    def id(self) -> str: ...

    @property
    def conn(self) -> Connection: ...


RoomKey = tuple[str, str]
"""(namespace, room)"""

Position = tuple[int, int]
Held = tuple[str, Position, bytes, PollingText]
"""A broadcast held for a recovering socket: (publication id, offset, frame, polling text)."""


class _Holding:
    """A recovering socket's place in a room before it becomes an ordinary member."""

    __slots__ = ("items", "until")

    def __init__(self) -> None:
        self.items: list[Held] = []
        self.until: Position | None = None
        """Once set: broadcasts at or before it were replayed already and are skipped; the first
        newer one is sent and makes the socket a member."""


class PollingForm:
    """The polling form of a broadcast's messages, made on first use and kept: ``b`` and base64
    for a binary message, the record separator between messages (which no encoded message
    contains).  A connection that upgrades with such a text still queued splits it again
    (``Connection.use_websocket``)."""

    __slots__ = ("_messages", "_text")

    def __init__(self, messages: list[str | bytes]) -> None:
        self._messages = messages
        self._text: str | None = None

    def __call__(self) -> str:
        text = self._text
        if text is None:
            text = self._text = SEPARATOR.join(
                "b" + base64.b64encode(m).decode("ascii") if isinstance(m, bytes) else "4" + m
                for m in self._messages
            )
        return text


def encode_messages(messages: list[str | bytes]) -> tuple[bytes, PollingForm]:
    """The Engine.IO messages of one packet as one WebSocket write (a frame per message), and
    their polling form (see :class:`PollingForm`)."""
    frames = [
        binary_frame(m) if isinstance(m, bytes) else text_frame(b"4" + m.encode("utf-8"))
        for m in messages
    ]
    return frames[0] if len(frames) == 1 else b"".join(frames), PollingForm(messages)


class Hub:
    __slots__ = (
        "_flusher",
        "_json",
        "_on_first",
        "_on_last",
        "_parser",
        "_pending",
        "last_offset",
        "rooms",
    )

    def __init__(
        self,
        on_first_member: Callable[[RoomKey], None],
        on_last_member: Callable[[RoomKey], None],
        flusher: Flusher,
        parser: Parser = JSON_PARSER,
    ) -> None:
        self._flusher = flusher
        self._parser = parser
        """How broadcasts are encoded: once per broadcast, the same bytes for every member."""
        self._json = parser is JSON_PARSER
        """Writes a broadcast to its members' connections (see :meth:`Flusher.send_all`)."""
        self.rooms: dict[RoomKey, dict[Member, Connection]] = {}
        """Each room's member sockets, with their connections (the broadcast loop walks the
        connections straight from the dict, not through each socket object)."""
        self._pending: dict[RoomKey, dict[Member, _Holding]] = {}
        """Sockets recovering missed events: live broadcasts are held for them."""
        self.last_offset: dict[RoomKey, Position] = {}
        """The newest offset broadcast per room with members."""
        self._on_first = on_first_member
        self._on_last = on_last_member

    def _interested(self, key: RoomKey) -> bool:
        return key in self.rooms or key in self._pending

    def _maybe_last(self, key: RoomKey) -> None:
        if not self._interested(key):
            self.last_offset.pop(key, None)
            self._on_last(key)

    def join(self, socket: Member, key: RoomKey) -> bool:
        """Add a member; return False if it already was one."""
        members = self.rooms.get(key)
        if members is None:
            first = not self._interested(key)
            self.rooms[key] = {socket: socket.conn}
            if first:
                self._on_first(key)
            return True
        if socket in members:
            return False
        members[socket] = socket.conn
        return True

    def leave(self, socket: Member, key: RoomKey) -> bool:
        held = self._pending.get(key)
        if held is not None and socket in held:
            self._unhold(socket, key)
            self._maybe_last(key)
            return True
        members = self.rooms.get(key)
        if members is None or socket not in members:
            return False
        del members[socket]
        if not members:
            del self.rooms[key]
            self._maybe_last(key)
        return True

    # -- recovery ---------------------------------------------------------------------------------
    def hold(self, socket: Member, key: RoomKey) -> None:
        """Start holding live broadcasts of ``key`` for a recovering socket."""
        held = self._pending.get(key)
        if held is None:
            first = not self._interested(key)
            self._pending[key] = {socket: _Holding()}
            if first:
                self._on_first(key)
        else:
            held[socket] = _Holding()

    def _unhold(self, socket: Member, key: RoomKey) -> list[Held]:
        held = self._pending.get(key)
        if held is None:
            return []
        holding = held.pop(socket, None)
        if not held:
            del self._pending[key]
        return holding.items if holding is not None else []

    def release(self, socket: Member, key: RoomKey) -> None:
        """Give up holding for ``socket`` (its recovery failed)."""
        self._unhold(socket, key)
        self._maybe_last(key)

    def settle(self, socket: Member, key: RoomKey, replayed: Position, seen: set[str]) -> None:
        """The socket was sent everything of ``key`` up to ``replayed``: send what was held
        after that, and make it a member as soon as no older broadcast can still arrive."""
        held = self._pending[key][socket]
        for pub_id, position, frame, text in held.items:
            if position > replayed and pub_id not in seen:
                seen.add(pub_id)
                socket.conn.send_encoded(frame, text)
                replayed = position
        held.items = []
        if self.last_offset.get(key, (0, 0)) >= replayed:
            self._unhold(socket, key)
            self.join(socket, key)
        else:
            held.until = replayed  # the broker has not delivered that far yet

    # -- fan-out ----------------------------------------------------------------------------------
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
        """Encode the event once and write the same bytes to every member; return the count.

        ``data`` may hold ``bytes`` anywhere: with the JSON parser they become binary
        attachments (a text frame and a binary frame per attachment, written together)."""
        members = self.rooms.get(key)
        held = self._pending.get(key)
        if not members and not held:
            return 0
        args = [event, data, offset] if offset is not None else [event, data]
        text: PollingText
        if self._json:
            try:
                text = encode_event_prefix(key[0]) + orjson.dumps(args).decode("utf-8")
                frame = text_frame(text.encode("utf-8"))
            except orjson.JSONEncodeError:  # bytes in the data: a binary event
                frame, text = encode_messages(
                    JSON_PARSER.encode(Packet(PacketType.EVENT, key[0], args))
                )
        else:
            frame, text = encode_messages(
                self._parser.encode(Packet(PacketType.EVENT, key[0], args))
            )
        position = parse_offset(offset) if offset else (0, 0)
        if position > self.last_offset.get(key, (0, 0)):
            self.last_offset[key] = position
        sent = 0
        if members:
            if exclude is None:
                self._flusher.send_all(members.values(), frame, text)
                sent = len(members)
            else:
                conns = [conn for socket, conn in members.items() if socket.id != exclude]
                self._flusher.send_all(conns, frame, text)
                sent = len(conns)
        if held:
            sent += self._to_held(key, held, (publication_id, position, frame, text), exclude)
        return sent

    def _to_held(
        self, key: RoomKey, held: dict[Member, _Holding], item: Held, exclude: str | None
    ) -> int:
        settled: list[Member] = []
        sent = 0
        for socket, holding in held.items():
            if socket.id == exclude:
                continue
            if holding.until is None:
                holding.items.append(item)
            elif item[1] > holding.until:
                socket.conn.send_encoded(item[2], item[3])
                settled.append(socket)
                sent += 1
            # else: already replayed to this socket
        for socket in settled:
            self._unhold(socket, key)
            self.join(socket, key)
        return sent
