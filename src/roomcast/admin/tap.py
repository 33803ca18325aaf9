"""What one instance tells the Admin UIs: its socket events, and its sockets on request.

A *watcher* is an instance with Admin UI sockets (:mod:`roomcast.admin.console`).  It renews a
lease on every instance every two seconds (the ``admin.watch`` request); while an instance has
a live lease it records what happens to its sockets (the :class:`Tap` is then the socket
server's observer; without a lease it is not, and recording costs nothing), and every
:data:`FLUSH_S` sends what it recorded to each watcher in one control message::

    {"t": "admin.feed", "from": instance, "first": seq, "events": [[name, *args], ...]}

Events are numbered (``seq``) per instance: the watcher sees a lost message, or events dropped
here, as a gap and asks for the sockets again.  A burst of more than :data:`MAX_BUFFER` events
between two flushes is dropped here (counted as ``admin_feed_overflow``) rather than forwarded
one by one: a resync costs the UI less than thousands of single updates.

:meth:`Tap.snapshot` answers ``admin.sockets``: the sockets as they are at ``seq``, sent in
chunks of :data:`CHUNK` sockets as ``admin.chunk`` messages (JSON text the watcher forwards to
its UIs without decoding), so no step holds the event loop for long.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

from roomcast.admin.serialize import iso_time, serialize
from roomcast.broker.base import BrokerError
from roomcast.connection import Connection
from roomcast.metrics import Metrics
from roomcast.socket import Socket
from roomcast.sockets import Client, SocketServer
from roomcast.tasks import TaskSet

__all__ = ["CHUNK", "FLUSH_S", "LEASE_S", "MAX_BUFFER", "Tap"]

log = logging.getLogger("roomcast.admin")

FLUSH_S: Final = 0.1
LEASE_S: Final = 6.0
"""Three missed renewals: the watcher is gone (or cut off), recording stops."""
MAX_BUFFER: Final = 2000
CHUNK: Final = 200
"""Sockets per chunk of a list: about 115 KB of JSON, 4-6 ms of the loop to make."""
MAX_ARGS_BYTES: Final = 2048
"""Event arguments longer than this (as JSON) are shown as their size only."""

Send = Callable[[dict[str, Any], str], Awaitable[None]]
"""Send a control message to one instance (``Cluster.send``)."""
Local = Callable[[dict[str, Any]], None]
"""Hand a feed message to this instance's own console, without the broker."""


class Tap:
    """This instance's recorder (the :class:`roomcast.socket.Observer` while leased)."""

    def __init__(
        self,
        instance: str,
        sockets: SocketServer,
        send: Send,
        local: Local,
        tasks: TaskSet,
        metrics: Metrics,
    ) -> None:
        self._instance = instance
        self._sockets = sockets
        self._send = send
        self._local = local
        self._tasks = tasks
        self._metrics = metrics
        self.seq = 0
        """The number of the last event recorded (or dropped)."""
        self._buffer: list[list[Any]] = []
        self._leases: dict[str, float] = {}
        """Watcher -> when its lease ends (``time.monotonic()``)."""
        self._task: asyncio.Task[None] | None = None
        self.lease_s = LEASE_S

    @property
    def active(self) -> bool:
        return self._task is not None

    # -- leases -----------------------------------------------------------------------------
    def watch(self, watcher: str) -> bool:
        """Renew ``watcher``'s lease; True if it had none (it missed what happened before)."""
        now = time.monotonic()
        fresh = self._leases.get(watcher, 0.0) <= now
        self._leases[watcher] = now + self.lease_s
        if self._task is None:
            self._sockets.observer = self
            self._task = self._tasks.spawn(self._flush_loop(), name="admin-tap")
        return fresh

    def _stop(self) -> None:
        self._sockets.observer = None
        self._task = None
        self._leases.clear()
        self._buffer = []

    async def _flush_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                now = time.monotonic()
                for watcher, until in list(self._leases.items()):
                    if until <= now:
                        del self._leases[watcher]
                        log.info("admin watcher %s stopped renewing; no longer recording", watcher)
                if not self._leases:
                    return
                await self._flush()
        finally:
            self._stop()

    async def _flush(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        self._buffer = []
        message = {
            "t": "admin.feed",
            "from": self._instance,
            "first": self.seq - len(buffer) + 1,
            "events": buffer,
        }
        for watcher in list(self._leases):
            if watcher == self._instance:
                self._local(message)
                continue
            try:
                await self._send(message, watcher)
            except BrokerError as exc:  # the watcher sees the gap and resyncs
                self._metrics.dropped.labels("admin_feed_unsent").inc(len(buffer))
                log.info("admin feed to %s not sent: %s", watcher, exc)

    # -- recording (the Observer) -----------------------------------------------------------
    def _record(self, event: list[Any]) -> None:
        self.seq += 1
        buffer = self._buffer
        buffer.append(event)
        if len(buffer) > MAX_BUFFER:
            self._metrics.dropped.labels("admin_feed_overflow").inc(len(buffer))
            log.info(
                "admin feed: %d events in %.1fs, dropped (the UIs resync)", len(buffer), FLUSH_S
            )
            self._buffer = []

    def connected(self, socket: Socket) -> None:
        self._record(["socket_connected", serialize(socket, self._instance), iso_time()])

    def disconnected(self, socket: Socket, reason: str, rooms: set[str]) -> None:
        now = iso_time()
        nsp = socket.namespace.name
        for room in rooms:
            self._record(["room_left", nsp, room, socket.id, now])
        self._record(["socket_disconnected", nsp, socket.id, reason, now])

    def joined(self, socket: Socket, room: str) -> None:
        self._record(["room_joined", socket.namespace.name, room, socket.id, iso_time()])

    def left(self, socket: Socket, room: str) -> None:
        self._record(["room_left", socket.namespace.name, room, socket.id, iso_time()])

    def received(self, socket: Socket, data: list[Any]) -> None:
        if not socket.namespace.internal:
            self._record(
                ["event_received", socket.namespace.name, socket.id, shown(data), iso_time()]
            )

    def sent(self, socket: Socket, data: list[Any]) -> None:
        if not socket.namespace.internal:
            self._record(["event_sent", socket.namespace.name, socket.id, shown(data), iso_time()])

    def upgraded(self, conn: Connection) -> None:
        """The engine's ``on_upgrade``: the connection's sockets now use WebSocket."""
        if self._task is None:
            return
        handler = conn.handler
        if isinstance(handler, Client):
            for socket in handler.sockets.values():
                self._record(
                    [
                        "socket_updated",
                        {"id": socket.id, "nsp": socket.namespace.name, "transport": "websocket"},
                    ]
                )

    # -- the sockets, on request ------------------------------------------------------------
    async def snapshot(self, watcher: str, ref: str, limit: int) -> dict[str, Any]:
        """Send the local sockets (the ``limit`` newest) to ``watcher`` in chunks; answer how
        many and at which ``seq`` (events up to it are in the chunks already; later ones
        follow in the feed: this renews the watcher's lease first)."""
        self.watch(watcher)
        seq = self.seq  # no await between this and the capture: they are the same instant
        captured, total = self.capture(limit)
        chunks = 0
        for start in range(0, len(captured), CHUNK):
            if start:
                await asyncio.sleep(0)  # let the loop breathe between chunks
            text = self.chunk(captured[start : start + CHUNK])
            await self._send(
                {"t": "admin.chunk", "from": self._instance, "ref": ref, "data": text}, watcher
            )
            chunks += 1
        return {"instance": self._instance, "seq": seq, "chunks": chunks, "total": total}

    def capture(self, limit: int) -> tuple[list[tuple[Socket, list[str]]], int]:
        """The sockets to list with their rooms now, and how many there are in all: the
        ``limit`` newest (the server's table is in the order they connected), and the Admin
        UIs' own sockets (few) in any case."""
        table = self._sockets.sockets
        total = len(table)
        if total <= limit:
            sockets = list(table.values())
        else:
            newest = (
                socket for socket in reversed(table.values()) if not socket.namespace.internal
            )
            sockets = list(itertools.islice(newest, limit))
            sockets += [socket for socket in table.values() if socket.namespace.internal]
        return [(socket, sorted(socket.rooms)) for socket in sockets], total

    def chunk(self, captured: list[tuple[Socket, list[str]]]) -> str:
        """The JSON text of these sockets' items, ready to join with ``,``."""
        part = [serialize(socket, self._instance, rooms) for socket, rooms in captured]
        return orjson.dumps(part).decode()[1:-1]


_SECRET_KEYS: Final = frozenset(
    {"token", "password", "authorization", "secret", "api_key", "apikey", "jwt", "access_token"}
)
"""Keys whose values the UI never sees (a refresh event's fresh token, say)."""


def shown(data: list[Any]) -> list[Any]:
    """Event arguments as the UI may show them, as plain JSON values: binary parts named by
    their size, secrets (:data:`_SECRET_KEYS`) replaced by ``[redacted]``, and the whole
    replaced by its size when longer than :data:`MAX_ARGS_BYTES`.  Never raises: what no JSON
    can hold is shown as ``?``."""
    try:
        text = orjson.dumps(data, default=_plain, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson refuses it all the same (nesting, an odd type inside)
        return ["?"]
    if len(text) > MAX_ARGS_BYTES:
        first = data[0] if data and isinstance(data[0], str) else "?"
        return [first, f"({len(text)} bytes)"]
    plain: list[Any] = _redacted(orjson.loads(text))
    return plain


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"(binary, {len(value)} bytes)"
    return str(value)[:100]


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "[redacted]" if k.lower() in _SECRET_KEYS else _redacted(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return value
