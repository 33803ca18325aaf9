"""One client connection: an Engine.IO v4 session over polling or WebSocket.

It owns the outbound path (a bounded buffer, written at most once per event-loop iteration),
the heartbeat timers and ``close(reason)``.  It never creates a task: timers are loop callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final, Protocol

from roomcast.protocol import engineio
from roomcast.protocol.engineio import PacketType
from roomcast.protocol.errors import EngineIOError
from roomcast.transport.http import Exchange, Request
from roomcast.transport.websocket import binary_frame, text_frame
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId

if TYPE_CHECKING:
    from roomcast.metrics import Metrics

log = logging.getLogger("roomcast.connection")

TIMER_TICK: Final = 0.02
"""Heartbeat deadlines are rounded down to a multiple of this many seconds (see
:meth:`Connection._schedule`): a timer may fire early by less than a tick, never late."""


PollingText = str | Callable[[], str]
"""A broadcast's polling form: the text, or a callable that makes it (and keeps it) on first use,
so that a broadcast nobody polls for does not pay for it (base64 of binary messages)."""


class State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class EngineHandler(Protocol):
    """What sits on top of a connection: the Socket.IO layer, or a raw Engine.IO app."""

    def on_message(self, message: str | bytes) -> None: ...

    def on_close(self, reason: str) -> None: ...


class Held(list[str | bytes]):
    """Messages read while the session may move to another worker (``handoff``), kept for
    whichever worker handles them.  ``on_close`` runs if the connection closes meanwhile: the
    session stays, and what was kept is handled before it closes."""

    __slots__ = ("on_close",)

    def __init__(self, on_close: Callable[[], None]) -> None:
        super().__init__()
        self.on_close = on_close


class Flusher:
    """Writes every connection's pending output once per event-loop iteration.

    Coalescing what a broadcast burst queued for one connection into one ``write()`` is what
    keeps the system-call count below one per delivered message. :attr:`epoch` counts loop
    iterations while anything is being sent (it stops counting one iteration after the last
    send), so a connection can tell whether it sent in this iteration or the one before; one
    that did not writes its next broadcast frame at once (see :meth:`Connection.send_encoded`).
    """

    __slots__ = ("_active", "_dirty", "_loop", "_scheduled", "epoch", "holding")

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False
        self._active = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.epoch = 0
        self.holding = 0
        """Inside :meth:`batch`: every frame is queued and coalesced, none written at once."""

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Several publications delivered back to back: each connection gets one write."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1

    def mark(self, conn: Connection) -> None:
        self._dirty.append(conn)
        self.touch()

    def touch(self) -> None:
        """Something is being sent in this iteration."""
        self._active = True
        if not self._scheduled:
            self._schedule()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once (on Python 3.11 each lookup is a ``getpid()``)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _schedule(self) -> None:
        self._scheduled = True
        self.loop.call_soon(self.flush)

    def send_all(self, conns: Iterable[Connection], frame: bytes, text: PollingText) -> None:
        """:meth:`Connection.send_encoded` to every connection of a broadcast.

        Its fast path (an idle WebSocket connection writes the frame at once) is unrolled here,
        so a member costs no Python call of its own; everything else goes through
        :meth:`Connection.send_encoded`.  This reads the connections' private state and must
        stay in step with that method.  ``benchmarks/fanout.py`` measures the whole path."""
        if self.holding:
            for conn in conns:
                conn.send_encoded(frame, text)
            return
        epoch = self.epoch
        self.touch()
        for conn in conns:
            transport = conn._transport
            if (
                conn._out is None
                and conn._open
                and transport is not None
                and epoch - conn._written > 1
            ):
                conn._written = epoch
                transport.write(frame)
                size = conn._out_size = transport.get_write_buffer_size()
                if size > conn.limit:
                    conn._overflow(written=1)
            else:
                conn.send_encoded(frame, text)

    def flush(self) -> None:
        self._scheduled = False
        self.epoch += 1
        active, self._active = self._active, False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()
        if active:  # count the next iteration too: it tells "sent just before" from "idle"
            self._schedule()


class Connection:
    __slots__ = (
        "_dismissing",
        "_flusher",
        "_metrics",
        "_open",
        "_out",
        "_out_size",
        "_poll",
        "_poll_headers",
        "_pongs_owed",
        "_queue",
        "_timer",
        "_transport",
        "_waiting_pong",
        "_written",
        "farewell",
        "handler",
        "limit",
        "moving",
        "on_closed",
        "ping_interval",
        "ping_timeout",
        "request",
        "sid",
        "state",
        "upgrading",
        "ws",
    )

    def __init__(
        self,
        sid: SessionId,
        request: Request,
        *,
        ping_interval: float,
        ping_timeout: float,
        limit: int,
        flusher: Flusher,
        metrics: Metrics,
        on_closed: Callable[[Connection, str], None],
    ) -> None:
        self.sid = sid
        self.request = request
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.limit = limit
        self.state = State.OPEN
        self.handler: EngineHandler | None = None
        self.ws: WebSocketConnection | None = None
        self.upgrading = False
        self.on_closed = on_closed
        self._flusher = flusher
        self._metrics = metrics
        self._out: list[bytes] | None = None
        self._out_size = 0
        self._queue: list[str | bytes] = []
        self._poll: Exchange | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_pong = False
        self._dismissing: str | None = None
        """The reason of :meth:`dismiss` while it waits for the client's PONG."""
        self._pongs_owed = 0
        self._open = True
        self._poll_headers: list[tuple[str, str]] = []
        """False once closed or overflowing: nothing more is queued or written."""
        self._transport: asyncio.Transport | None = None
        """The WebSocket's transport, written directly on the broadcast path."""
        self._written = -2
        """The :attr:`Flusher.epoch` in which this connection last sent a broadcast frame."""
        self.farewell: str | None = None
        """Polling only: the last payload (ending in CLOSE) that no poll was there to take."""
        self.moving: Held | None = None
        """While the session may move to another worker: what was read meanwhile."""

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # -- sending ----------------------------------------------------------------------------
    def has_output(self) -> bool:
        """Something is queued that has not been handed to the transport yet."""
        return self._out is not None or bool(self._queue)

    def send_packet(self, kind: PacketType, data: str = "") -> None:
        text = f"{kind.value}{data}"
        if self.ws is not None:
            self._push(text_frame(text.encode("utf-8")))
        else:
            self._enqueue(text)

    def send_messages(self, messages: list[str | bytes]) -> None:
        """Send Engine.IO message packets (``4``-prefixed text, or binary)."""
        for message in messages:
            if isinstance(message, bytes):
                if self.ws is not None:
                    self._push(binary_frame(message))
                else:
                    self._enqueue(message)
            elif self.ws is not None:
                self._push(text_frame(b"4" + message.encode("utf-8")))
            else:
                self._enqueue("4" + message)

    def send_encoded(self, frame: bytes, text: PollingText) -> None:
        """The broadcast hot path: a pre-built WebSocket frame, or its polling text form (or
        what makes that text once, for the first polling member: see :data:`PollingText`).

        A connection that sent nothing in this loop iteration or the one before writes the
        frame at once: in a big room the first members then receive while the loop still
        walks the rest, and nothing is queued, marked and walked a second time. A busy
        connection queues it, and the :class:`Flusher` coalesces everything it got in the
        iteration into one ``write()``; so does every connection inside :meth:`Flusher.batch`
        (a broker delivering a fetch's worth of publications). This runs once per member of
        every broadcast."""
        transport = self._transport
        if transport is None:
            self._enqueue(text if isinstance(text, str) else text())
            return
        out = self._out
        if out is not None:
            out.append(frame)
        elif not self._open:
            self._closed_drop()
            return
        else:
            flusher = self._flusher
            epoch = flusher.epoch
            idle = epoch - self._written > 1 and not flusher.holding
            self._written = epoch
            if idle:
                flusher.touch()
                transport.write(frame)
                size = self._out_size = transport.get_write_buffer_size()
                if size > self.limit:
                    self._overflow(written=1)
                return
            self._out = [frame]
            flusher.mark(self)
        self._out_size += len(frame)
        if self._out_size > self.limit:
            self._overflow()

    def _push(self, frame: bytes) -> None:
        if not self._open:
            self._closed_drop()
            return
        out = self._out
        if out is None:
            self._out = [frame]
            self._flusher.mark(self)
        else:
            out.append(frame)
        self._out_size += len(frame)
        if self._out_size > self.limit:
            self._overflow()

    def _enqueue(self, packet: str | bytes) -> None:
        if not self._open:
            self._closed_drop()
            return
        queue = self._queue
        queue.append(packet)
        self._out_size += len(packet)
        if self._out_size > self.limit:
            self._overflow()
            return
        if len(queue) == 1 and self._poll is not None:
            self._flusher.mark(self)

    def flush(self) -> None:
        out = self._out
        if out is not None:  # WebSocket: one write for everything queued this iteration
            self._out = None
            transport = self._transport
            if transport is None:
                raise RuntimeError("frames queued without a websocket transport")
            if self._open:
                transport.write(out[0] if len(out) == 1 else b"".join(out))
                size = self._out_size = transport.get_write_buffer_size()
                if size > self.limit:
                    self._overflow(written=len(out))
        elif self._poll is not None and self._queue and self._open:
            self._answer_poll()

    def _answer_poll(self) -> None:
        poll, self._poll = self._poll, None
        assert poll is not None
        queue, self._queue = self._queue, []
        self._out_size = 0
        poll.respond(
            200,
            engineio.encode_payload(queue),
            self._poll_headers,
            content_type="text/plain; charset=UTF-8",
        )

    def _closed_drop(self) -> None:
        """A message for a connection that is closing (or was dropped as too slow); one for a
        client being dismissed reaches it on the instance it recovers on."""
        reason = "connection_closed" if self._dismissing is None else "dismissed"
        self._metrics.dropped.labels(reason).inc()
        log.debug(
            "dropped a message for closed connection %s",
            self.sid,
            extra={"sid": self.sid, "reason": reason},
        )

    def _overflow(self, written: int = 0) -> None:
        """Drop what is queued and close on the next loop iteration: this may run inside a
        broadcast that is iterating over the room this connection is a member of.

        ``written``: messages of the write that crossed the limit. They sit in the transport's
        buffer, which the close discards (the connection is aborted), so they are lost too.
        Earlier messages still in that buffer are not counted one by one (only their bytes are
        known); a client that recovers its session gets all of them back."""
        if not self._open:
            return
        self._open = False  # nothing more is queued until the close runs
        lost = len(self._out or ()) + len(self._queue) + written
        self._out = None
        self._queue = []
        self._metrics.slow_client_disconnects.inc()
        self._metrics.dropped.labels("slow_client").inc(lost)
        log.warning(
            "closing %s: outbound buffer over %d bytes (slow client)",
            self.sid,
            self.limit,
            extra={"sid": self.sid, "reason": "slow_client"},
        )
        asyncio.get_running_loop().call_soon(self._close_slow)

    def _close_slow(self) -> None:
        self.close("slow client: outbound buffer full", notify=False)

    # -- polling ----------------------------------------------------------------------------
    def attach_poll(self, exchange: Exchange, headers: list[tuple[str, str]]) -> None:
        """A GET arrived.  Answer now if packets are queued, else hold it (a long-poll).

        ``headers`` (CORS) go on whatever answers it, now or later."""
        self._poll_headers = headers
        if self._queue:
            self._poll = exchange
            self._answer_poll()
            return
        if self.upgrading:
            exchange.respond(200, "6", headers)
            return
        self._poll = exchange
        exchange.on_abort.append(self._poll_aborted)

    def has_poll(self) -> bool:
        return self._poll is not None

    def _poll_aborted(self) -> None:
        self._poll = None
        if self.ws is None and not self.upgrading:
            self.close("polling request aborted", notify=False)

    def release_poll(self, packet: str) -> None:
        """End a held long-poll with a single packet (``6`` noop or ``1`` close)."""
        poll, self._poll = self._poll, None
        if poll is not None and not poll.done:
            poll.respond(200, packet, self._poll_headers)

    # -- WebSocket ----------------------------------------------------------------------------
    def use_websocket(self, ws: WebSocketConnection) -> None:
        """Make ``ws`` the transport: on open, or when an upgrade completes."""
        self.ws = ws
        self._transport = ws.transport
        self.upgrading = False
        self.release_poll("6")
        queue, self._queue = self._queue, []
        self._out_size = 0
        frames: list[bytes] = []
        for packet in queue:
            if isinstance(packet, bytes):
                frames.append(binary_frame(packet))
            elif packet.startswith("b") or engineio.SEPARATOR in packet:
                # a broadcast's polling form (``hub.PollingForm``): binary messages as base64,
                # or several messages joined
                frames.extend(
                    binary_frame(part) if binary else text_frame(part)
                    for binary, part in engineio.split_payload(packet)
                )
            else:
                frames.append(text_frame(packet.encode("utf-8")))
        if self._dismissing is not None:  # what was queued before the dismissal, and its PING
            if frames:
                ws.write(b"".join(frames))
            return
        for frame in frames:
            self._push(frame)

    # -- receiving ----------------------------------------------------------------------------
    def receive(self, packet: engineio.Packet) -> None:
        kind = packet.type
        if kind is PacketType.MESSAGE:
            if self.handler is not None:
                self.handler.on_message(packet.data)
        elif kind is PacketType.PONG:
            if self._dismissing is not None:
                self._pongs_owed -= 1
                if self._pongs_owed <= 0:
                    self.close(self._dismissing)
            elif self._waiting_pong:
                self._waiting_pong = False
                self._schedule(self.ping_interval, self._ping)
        elif kind is PacketType.CLOSE:
            self.close("client closed the session", notify=False, poll_answer="6")
        elif kind is PacketType.NOOP:
            return
        else:
            raise EngineIOError(f"unexpected {kind.name} packet from the client")

    # -- heartbeat ----------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        self._schedule(self.ping_interval, self._ping)

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay``, rounded down to a multiple of :data:`TIMER_TICK`.

        Heartbeat timers of thousands of connections then fall on a few instants per second,
        each one loop wake-up, instead of one wake-up per connection; the pongs they provoke
        come back together as well.  Rounding down keeps the protocol's promise: a ping is
        never later than pingInterval, a silent session never outlives pingTimeout (it may
        come up to one tick early, which the spec allows a server; late breaks clients and
        the official suites)."""
        if self._timer is not None:
            self._timer.cancel()
        loop = self._flusher.loop
        when = math.floor((loop.time() + delay) / TIMER_TICK) * TIMER_TICK
        self._timer = loop.call_at(when, callback)

    def heartbeat_state(self) -> tuple[float, bool]:
        """Seconds until the heartbeat timer fires, and whether it waits for a pong."""
        timer = self._timer
        remaining = timer.when() - self._flusher.loop.time() if timer is not None else 0.0
        return max(remaining, 0.0), self._waiting_pong

    def resume_heartbeat(self, delay: float, waiting_pong: bool) -> None:
        """Go on with a heartbeat that another worker ran (see :meth:`heartbeat_state`)."""
        self._waiting_pong = waiting_pong
        self._schedule(delay, self._ping_timed_out if waiting_pong else self._ping)

    def _ping(self) -> None:
        self._waiting_pong = True
        self.send_packet(PacketType.PING)
        self._schedule(self.ping_timeout, self._ping_timed_out)

    def _ping_timed_out(self) -> None:
        self._timer = None
        self.close("ping timeout", notify=False)

    # -- dismissal ----------------------------------------------------------------------------
    def dismiss(self, reason: str) -> None:
        """Close with a CLOSE packet that the client handles after everything sent before it.

        socket.io-client hands a decoded packet to its socket on the next tick, so messages it
        reads together with a CLOSE (one polling payload, or frames of one TCP read) reach the
        socket after it disconnected: it keeps them for later without moving its recovery
        offset, and, recovering elsewhere, gets them a second time. So everything queued is
        sent, then a PING, and nothing more (a later message is dropped and counted; the
        client recovers it elsewhere); the CLOSE goes alone once the PONG is back, or at
        pingTimeout if it never comes."""
        if self.state is State.CLOSED or self._dismissing is not None:
            return
        if not self._open:  # being closed as too slow
            self.close(reason)
            return
        self._dismissing = reason
        self.flush()
        self._open = False
        self._pongs_owed = 2 if self._waiting_pong else 1  # pongs come back in order
        if self.ws is not None:
            self.ws.write(text_frame(b"2"))
        else:
            self._queue.append("2")
            if self._poll is not None:
                self._answer_poll()
        self._schedule(self.ping_timeout, self._dismiss_timed_out)

    @property
    def dismissing(self) -> bool:
        return self._dismissing is not None

    def _dismiss_timed_out(self) -> None:
        self._timer = None
        assert self._dismissing is not None
        self.close(self._dismissing)

    # -- closing ------------------------------------------------------------------------------
    def detach(self) -> None:
        """The session moved to another worker: stop it here without closing the connection
        (no CLOSE packet, no close frame, no disconnect counted)."""
        self._stop()
        self.moving = None
        self.handler = None
        if self.ws is not None:
            self.ws.detach()

    def _stop(self) -> None:
        """Nothing more is sent, queued or timed here."""
        self.state = State.CLOSED
        self._open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out = None
        self._queue = []

    def close(self, reason: str, *, notify: bool = True, poll_answer: str = "1") -> None:
        """Close the session once.  ``notify`` sends a CLOSE packet to the client first."""
        if self.state is State.CLOSED:
            return
        held = self.moving
        if held is not None:
            held.on_close()
            if self.closed:  # a kept message closed it
                return
        if notify and self.ws is not None:
            self.flush()
            self.ws.write(text_frame(b"1"))
        elif notify and (self._open or self._dismissing is not None):
            # Polling: what is queued, then CLOSE, goes to the held poll or, if none is held,
            # is kept by the endpoint for the client's next poll.
            self._queue.append("1")
            if self._poll is not None:
                self._answer_poll()
            else:
                self.farewell = engineio.encode_payload(self._queue)
        self._stop()
        self.release_poll(poll_answer)
        if self.ws is not None:
            if reason.startswith("slow client"):
                # Abort: a close frame would wait behind the unread buffer, and a client that
                # never reads would keep the socket and its buffer alive indefinitely.
                self.ws.abort()
            else:
                self.ws.close(1000 if notify else 1001, "")
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.on_close(reason)
        self.on_closed(self, reason)
