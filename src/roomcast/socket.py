"""One Socket.IO socket: a client's membership of one namespace, the object handlers receive.

A socket reaches what it shares with the other sockets (hub, broker, metrics, options)
through its client's server, typed here as :class:`SocketHost` so that this module does not
depend on :mod:`roomcast.sockets`, which creates sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from roomcast.app import Namespace, Registered
from roomcast.auth import Authenticator, Principal, validate_room
from roomcast.broker.base import (
    Broker,
    Publication,
    UserQuota,
)
from roomcast.broker.offsets import parse_offset
from roomcast.connection import Connection
from roomcast.http.errors import ack_error, ack_invalid_payload, ack_rate_limited
from roomcast.hub import Hub
from roomcast.limits import Bucket, Refusals, SocketRates, UserConnections
from roomcast.logs import log_context
from roomcast.metrics import Metrics
from roomcast.observer import Observer
from roomcast.protocol.parser import Parser
from roomcast.protocol.socketio import JSON_PARSER, Limits, Packet, PacketType
from roomcast.revocation import Revocations
from roomcast.schemas import EventSchema, InvalidPayloadError, payload_of
from roomcast.sessions import session_key
from roomcast.subscriptions import Subscriptions
from roomcast.tasks import TaskSet
from roomcast.types import SocketId

if TYPE_CHECKING:
    from roomcast.tracing import Tracing

log = logging.getLogger("roomcast.sockets")


BuiltinEvent = Callable[["Socket", list[Any], int | None], None]
"""A built-in event of the main namespace: ``(socket, args, ack id)``."""


class Mover(Protocol):
    """Moves a session to the worker that owns a room (``handoff.Handoff``, with workers)."""

    def offer(self, socket: Socket, room: str, ack_id: int | None) -> bool:
        """Called for an authorized join.  True: the session is on its way to the room's
        owner, which answers the join (or, if the move fails, this worker answers it)."""
        ...


ANONYMOUS = Principal(user_id="", rooms=("**",), publish=("**",), expires_at=None, claims={})


@dataclass(frozen=True, slots=True)
class SocketOptions:
    connect_timeout_ms: int = 45_000
    auth_required: bool = True
    recovery_ms: int = 120_000
    """How long a disconnected socket may recover its session; 0 disables recovery."""
    upstream_events: tuple[str, ...] = ()
    max_rooms: int = 1000
    """Rooms one socket may be in: each costs the hub and the recovery state."""
    limits: Limits = field(default_factory=Limits)
    ack_timeout_s: float = 30.0
    event_schemas: Mapping[str, EventSchema] = field(default_factory=dict)
    """``--event-schemas``: client events (and publications) of these names are checked."""
    parser: Parser = JSON_PARSER
    """``--parser``: the packet codec every client of this server speaks."""
    rates: SocketRates = field(default_factory=SocketRates)
    """Events and joins per socket (``roomcast.limits``)."""
    user_quota: UserQuota = field(default_factory=UserQuota)
    """New and concurrent connections per user (``roomcast.limits.UserConnections``)."""
    connects_in_flight: int = 16
    """Namespace connects (token check, recovery) in progress at once; the others wait in
    order. A reconnection storm otherwise starts thousands of recoveries together: they queue
    for the broker's connections, their commands time out, and clients lose their sessions
    (3,000 clients at once: 154 did)."""


class SocketHost(Protocol):
    """What a socket needs of the server that holds it (:class:`roomcast.sockets.SocketServer`)."""

    @property
    def options(self) -> SocketOptions: ...
    @property
    def hub(self) -> Hub: ...
    @property
    def broker(self) -> Broker: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def tasks(self) -> TaskSet: ...
    @property
    def subscriptions(self) -> Subscriptions: ...
    @property
    def sockets(self) -> dict[SocketId, Socket]: ...
    @property
    def builtins(self) -> Mapping[Any, BuiltinEvent]: ...
    @property
    def handoff(self) -> Mover | None: ...
    @property
    def auth(self) -> Authenticator | None: ...
    @property
    def revocations(self) -> Revocations: ...
    @property
    def refusals(self) -> Refusals: ...
    @property
    def users(self) -> UserConnections: ...
    @property
    def tracing(self) -> Tracing | None: ...
    @property
    def observer(self) -> Observer[Socket] | None: ...

    def drop(self, reason: str, detail: str) -> None: ...

    def save_session(self, socket: Socket, ttl_ms: int, *, final: bool = False) -> None: ...

    def forget_session(self, socket: Socket) -> None: ...


class SocketClient(Protocol):
    """What a socket needs of its connection's client (:class:`roomcast.sockets.Client`)."""

    @property
    def server(self) -> SocketHost: ...
    @property
    def conn(self) -> Connection: ...
    @property
    def sockets(self) -> dict[str, Socket]: ...
    @property
    def settled(self) -> bool: ...

    def send(self, packet: Packet) -> None: ...

    def detach(self) -> None:
        """The session moved to another worker (``handoff``): forget its sockets here."""
        ...


KICK_GRACE_S = 1.0
"""How long a connection whose last socket was disconnected for a rate limit may stay open."""


def _close_if_idle(client: SocketClient) -> None:
    if not client.sockets and not client.conn.closed:
        client.conn.close("rate_limited_linger: no namespace left after a rate_limited kick")


def hold_name(sid: str, namespace: str) -> str:
    """A socket's place among its user's connections: its session and namespace."""
    return sid + namespace


class Socket:
    """One client's membership of one namespace: the object handlers receive."""

    __slots__ = (
        "_ack_seq",
        "_acks",
        "_expiry",
        "auth",
        "client",
        "conn",
        "connected",
        "events_bucket",
        "id",
        "joins_bucket",
        "namespace",
        "owed",
        "pid",
        "principal",
        "recovering",
        "rooms",
        "since",
    )

    def __init__(
        self,
        client: SocketClient,
        namespace: Namespace,
        principal: Principal,
        auth: dict[str, Any],
        *,
        sid: SocketId | None = None,
        pid: str | None = None,
    ) -> None:
        self.client = client
        self.conn = client.conn
        self.namespace = namespace
        self.principal = principal
        self.auth = auth
        self.id = sid or SocketId(secrets.token_urlsafe(15))
        recovery = client.server.options.recovery_ms and not namespace.internal
        self.pid = pid or (secrets.token_urlsafe(15) if recovery else "")
        self.rooms: set[str] = set()
        self.connected = False
        self.recovering: tuple[list[str], list[Publication], tuple[int, int]] | None = None
        self._acks: dict[int, asyncio.Future[list[Any]]] = {}
        self._ack_seq = 0
        self._expiry: asyncio.TimerHandle | None = None
        self.owed = 0
        """Tasks running that will answer the client (an ack): the socket must not move."""
        self.since = 0.0
        """When the socket connected (seconds since the Unix epoch)."""
        rates = client.server.options.rates
        self.events_bucket: Bucket | None = rates.events.bucket() if rates.events else None
        self.joins_bucket: Bucket | None = rates.joins.bucket() if rates.joins else None

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    @property
    def hold(self) -> str:
        """What holds this socket's place among its user's connections (``limits``)."""
        return hold_name(self.conn.sid, self.namespace.name)

    @property
    def session_key(self) -> str:
        """Where this socket's recovery state is kept in the broker (see :func:`session_key`)."""
        return session_key(self.pid, self.principal.user_id)

    def recovery_state(self) -> bytes:
        """What a reconnecting client needs to recover this socket (see ``Client._recover``)."""
        # json, not orjson: orjson's result keeps a 4 KiB buffer, and states are held for minutes
        return json.dumps(
            {
                "sid": self.id,
                "user": self.principal.user_id,
                "nsp": self.namespace.name,
                "rooms": sorted(self.rooms),
            },
            separators=(",", ":"),
        ).encode()

    @property
    def handshake(self) -> dict[str, Any]:
        req = self.conn.request
        return {"headers": req.headers, "query": req.query, "address": req.client}

    # -- lifecycle --------------------------------------------------------------------------------
    def connected_at(self, *, save: bool = True) -> None:
        server = self.client.server
        self.connected = True
        self.since = time.time()
        self.client.sockets[self.namespace.name] = self
        server.sockets[self.id] = self
        server.metrics.sockets.inc()
        expires = self.principal.expires_at
        if expires is not None:
            delay = max(expires - time.time(), 0.0)
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)
        if self.recovering is None and save:
            server.save_session(self, server.options.recovery_ms)
        if self.recovering is None and (observer := server.observer) is not None:
            observer.connected(self)  # a recovered socket: once it has its rooms back

    def detach(self) -> None:
        """See :meth:`Client.detach`."""
        self._unregister()

    def _unregister(self) -> None:
        """No longer connected on this worker: out of the server's sockets, no expiry timer."""
        server = self.client.server
        self.connected = False
        if server.sockets.get(self.id) is self:  # else a recovery took the id over
            del server.sockets[self.id]
        server.metrics.sockets.dec()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    @property
    def movable(self) -> bool:
        """In no room, waiting for no ack, and nothing else in flight: the socket can move to
        another worker with its session."""
        return (
            self.connected
            and not self.rooms
            and self.recovering is None
            and not self._acks
            and not self.owed
            and self.client.settled
        )

    def abandon_recovery(self) -> None:
        """The recovered socket will not connect after all: stop holding its rooms."""
        if self.recovering is not None:
            rooms = self.recovering[0]
            self.recovering = None
            for room in rooms:
                self.client.server.hub.release(self, (self.namespace.name, room))

    def finish_recovery(self) -> None:
        """Replay what was missed, then the live broadcasts held meanwhile, then go live."""
        assert self.recovering is not None
        rooms, missed, after = self.recovering
        self.recovering = None
        hub = self.client.server.hub
        seen: set[str] = set()
        replayed = dict.fromkeys(rooms, after)
        for publication in missed:
            seen.add(publication.id)
            try:
                self.emit(publication.event, publication.data, publication.offset)
            except (TypeError, ValueError) as exc:  # stored data no packet can carry
                self.client.server.drop(
                    "unencodable", f"publication {publication.offset} for {self.id}: {exc}"
                )
            replayed[publication.room] = max(
                replayed[publication.room], parse_offset(publication.offset)
            )
        for room in rooms:
            self.rooms.add(room)
            hub.settle(self, (self.namespace.name, room), replayed[room], seen)
        server = self.client.server
        server.save_session(self, server.options.recovery_ms)
        if (observer := server.observer) is not None:
            observer.connected(self)

    def _token_expired(self) -> None:
        self._expiry = None
        self.kick("token_expired", "token expired")

    def kick(self, code: str, message: str) -> None:
        """End this socket for a reason the client sees: a ``roomcast:disconnect`` event
        ``{code, message}``, then a server disconnect (the client does not reconnect by
        itself).  Counted in ``roomcast_disconnects_total{reason=code}``."""
        if not self.connected:
            return
        self.client.server.metrics.disconnects.labels(code).inc()
        log.info(
            "ending socket %s of %r: %s",
            self.id,
            self.principal.user_id,
            code,
            extra={"socket": self.id, "user": self.principal.user_id, "reason": code},
        )
        self.emit("roomcast:disconnect", {"code": code, "message": message})
        self.disconnect()

    def refresh(self, principal: Principal) -> list[str]:
        """Take a fresh token's claims (same user); leave the rooms they no longer allow and
        return them.  The socket keeps its id and its other rooms."""
        self.principal = principal
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if principal.expires_at is not None:
            delay = max(principal.expires_at - time.time(), 0.0)
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)
        left = sorted(room for room in self.rooms if not principal.may_join(room))
        for room in left:
            self.leave(room)
        return left

    def disconnect(self) -> None:
        """Server-side disconnect of this namespace (the client will not reconnect by itself)."""
        if self.connected:
            self.client.send(Packet(PacketType.DISCONNECT, self.namespace.name))
            self.closed("server namespace disconnect", client_initiated=True)

    def supersede(self) -> None:
        """The session reconnected on another connection (a client whose old transport has
        not timed out yet): end this socket, leaving its recovery state to the new one."""
        if self.connected:
            self.client.send(Packet(PacketType.DISCONNECT, self.namespace.name))
            self.closed("superseded by a reconnection", client_initiated=False, keep_state=True)

    def closed(self, reason: str, *, client_initiated: bool, keep_state: bool = False) -> None:
        """The socket is gone: out of its rooms; its recovery state is saved (a transport that
        ended), forgotten (the client left, or a protocol error) or, ``keep_state``, left as
        it is (another socket took the session over)."""
        if not self.connected:
            return
        self._unregister()
        client = self.client
        server = client.server
        server.users.release(self.user_id, self.hold)
        client.sockets.pop(self.namespace.name, None)
        for room in self.rooms:
            server.hub.leave(self, (self.namespace.name, room))
        if (observer := server.observer) is not None:
            observer.disconnected(self, reason, self.rooms)
        if keep_state:
            pass
        elif client_initiated or reason.startswith("protocol error"):
            server.forget_session(self)
        else:
            server.save_session(self, server.options.recovery_ms, final=True)
        self.rooms = set()
        for future in self._acks.values():
            if not future.done():
                future.cancel()
        self._acks.clear()
        for reg in self.namespace.disconnect:
            server.tasks.spawn(reg.handler(self, reason), name=f"disconnect-{self.id}")

    # -- server-side API --------------------------------------------------------------------------
    def emit(self, event: str, *args: Any) -> None:
        """Send an event to this socket."""
        if self.connected or self.recovering is not None:
            data = [event, *args]
            self.client.send(Packet(PacketType.EVENT, self.namespace.name, data))
            if (observer := self.client.server.observer) is not None:
                observer.sent(self, data)
        else:
            self.client.server.drop("socket_disconnected", f"event {event!r} for {self.id}")

    async def call(self, event: str, *args: Any, ack_timeout_s: float | None = None) -> list[Any]:
        """Send an event that asks for an ack; return the ack's arguments.

        Raises ``TimeoutError`` after ``ack_timeout_s`` (default: the configured ack timeout).
        """
        self._ack_seq += 1
        ack_id = self._ack_seq
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        data = [event, *args]
        self._acks[ack_id] = future
        try:  # an event no packet can carry leaves no ack waiting
            self.client.send(Packet(PacketType.EVENT, self.namespace.name, data, ack_id))
        except BaseException:
            self._acks.pop(ack_id, None)
            raise
        if (observer := self.client.server.observer) is not None:
            observer.sent(self, data)
        try:
            default = self.client.server.options.ack_timeout_s
            limit = default if ack_timeout_s is None else ack_timeout_s
            async with asyncio.timeout(limit):
                return await future
        finally:
            self._acks.pop(ack_id, None)

    def join(self, room: str) -> None:
        """Add this socket to ``room`` (no authorization: that is the caller's decision)."""
        room = validate_room(room)
        server = self.client.server
        if server.hub.join(self, (self.namespace.name, room)):
            self.rooms.add(room)
            server.save_session(self, server.options.recovery_ms)
            if (observer := server.observer) is not None:
                observer.joined(self, room)

    def leave(self, room: str) -> None:
        server = self.client.server
        if server.hub.leave(self, (self.namespace.name, room)):
            self.rooms.discard(room)
            server.save_session(self, server.options.recovery_ms)
            if (observer := server.observer) is not None:
                observer.left(self, room)

    # -- client events ----------------------------------------------------------------------------
    def on_event(self, data: list[Any], ack_id: int | None) -> None:
        server = self.client.server
        server.metrics.client_events.inc()
        bucket = self.events_bucket
        if bucket is not None and not bucket.take():
            self.rate_limited(bucket, "events", ack_id)
            return
        if (observer := server.observer) is not None:
            observer.received(self, data)
        name, args = data[0], data[1:]
        registered = self.namespace.events.get(name) if isinstance(name, str) else None
        if registered is not None:
            self._run(registered, name, args, ack_id)
            return
        if self.namespace.internal:  # the gateway's own namespace: its handlers only
            server.drop("no_handler", f"event {str(name)[:40]!r} from {self.id}")
            if ack_id is not None:
                self.ack(ack_id, ack_error("unknown_event", "no such event here"))
            return
        builtin = server.builtins.get(name)
        if builtin is not None:
            builtin(self, args, ack_id)
            return
        server.drop("no_handler", f"event {str(name)[:40]!r} from {self.id}")
        if ack_id is not None:
            self.ack(ack_id, ack_error("unknown_event", f"no handler for event {str(name)[:40]!r}"))

    def _run(self, registered: Registered, name: str, args: list[Any], ack_id: int | None) -> None:
        if not registered.accepts(len(args)):
            self.client.server.drop("bad_arguments", f"event {name!r} with {len(args)} arguments")
            if ack_id is not None:
                self.ack(
                    ack_id, ack_error("bad_arguments", f"wrong number of arguments for {name!r}")
                )
            return
        schema = registered.schema or self.client.server.options.event_schemas.get(name)
        if schema is not None and self.refused(name, payload_of(args), schema, ack_id):
            return
        self.answer_later(
            self._call_handler(registered.handler(self, *args), ack_id), f"event-{name}"
        )

    async def _call_handler(self, call: Coroutine[Any, Any, Any], ack_id: int | None) -> None:
        # This task's own context: every line logged while the handler runs (the
        # application's too) names the socket and its user.
        log_context.set({"socket": self.id, "user": self.user_id, "namespace": self.namespace.name})
        try:
            result = await call
        except Exception:  # task boundary: log, count, and answer the client's ack
            self.client.server.drop("handler_failed", f"handler of {self.namespace.name}")
            log.exception("event handler failed on %s", self.id)
            if ack_id is not None:
                self.ack(ack_id, ack_error("internal_error", "the event handler failed"))
            return
        if ack_id is not None:
            if result is None:
                self.ack(ack_id)
            elif isinstance(result, tuple):
                self.ack(ack_id, *result)
            else:
                self.ack(ack_id, result)

    def refused(
        self,
        event: str,
        payload: Any,
        schema: EventSchema,
        ack_id: int | None,
        source: str = "client_event",
    ) -> bool:
        """Check ``payload`` against ``schema``; if it fails, count, log and answer the ack
        with ``invalid_payload`` and its details, and return True (the event goes no further)."""
        issues = schema.issues(payload)
        if issues is None:
            return False
        error = InvalidPayloadError(event, issues)
        server = self.client.server
        server.metrics.invalid_payloads.labels(source, event).inc()
        server.drop("invalid_payload", f"{error} (from {self.id})")
        if ack_id is not None:
            self.ack(ack_id, ack_invalid_payload(error))
        return True

    def rate_limited(self, bucket: Bucket, limit: str, ack_id: int | None) -> None:
        """``bucket`` refused an event: count and log it (bounded), answer its ack with
        ``rate_limited`` and the retry-after; a socket far over its limit is disconnected."""
        server = self.client.server
        server.refusals.refused(limit, f"socket {self.id} of user {self.user_id[:40]!r}")
        if not bucket.overflowed(server.options.rates.disconnect_factor):
            if ack_id is not None:
                self.ack(ack_id, ack_rate_limited(limit, bucket.retry_after_ms()))
            return
        self.kick("rate_limited", f"far over the {limit} rate limit")
        if not self.client.sockets:
            # The official client closes its connection on this notice; one that goes on
            # sending to the closed namespace loses the connection after a grace.  (Closed at
            # once, the close would overtake the notice: the client handles packets a tick
            # after it reads them, but a close at once.)
            asyncio.get_running_loop().call_later(KICK_GRACE_S, _close_if_idle, self.client)

    def answer_later(self, call: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``call``, which may answer the client, in a task; the socket owes it meanwhile."""
        self.owed += 1
        self.client.server.tasks.spawn(call, name=name).add_done_callback(self._paid)

    def _paid(self, task: asyncio.Task[Any]) -> None:
        self.owed -= 1

    def ack(self, ack_id: int, *args: Any) -> None:
        if self.connected:
            self.client.send(Packet(PacketType.ACK, self.namespace.name, list(args), ack_id))
        else:
            self.client.server.drop("socket_disconnected", f"ack {ack_id} for {self.id}")

    def on_ack(self, ack_id: int | None, data: list[Any]) -> None:
        future = self._acks.pop(ack_id, None) if ack_id is not None else None
        if future is None or future.done():
            self.client.server.drop("unknown_ack", f"ack {ack_id} from {self.id}")
            return
        future.set_result(data)
