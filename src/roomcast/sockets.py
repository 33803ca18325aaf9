"""The Socket.IO v5 layer: one :class:`Client` per connection, one :class:`Socket` per namespace.

Built-in events of the main namespace: ``join``, ``leave`` and ``publish`` (rooms authorized by the
token's ``rooms`` / ``publish`` claims), and the configured upstream events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from roomcast.app import Application, ConnectRefusedError, Namespace, Registered
from roomcast.auth import (
    Authenticator,
    AuthError,
    Principal,
    token_from_request,
    validate_room,
)
from roomcast.broker.base import (
    Broker,
    BrokerError,
    History,
    Publication,
)
from roomcast.broker.offsets import OffsetError, parse_offset
from roomcast.connection import Connection
from roomcast.http.errors import ack_error, connect_error_payload
from roomcast.hub import Hub
from roomcast.metrics import Metrics
from roomcast.protocol.errors import ProtocolError, SocketIOError
from roomcast.protocol.socketio import (
    Decoder,
    Limits,
    Packet,
    PacketType,
)
from roomcast.sessions import PID_RE, SessionWriter, session_key
from roomcast.subscriptions import Subscriptions
from roomcast.tasks import TaskSet
from roomcast.types import SocketId

log = logging.getLogger("roomcast.sockets")


BuiltinEvent = Callable[["Socket", list[Any], int | None], None]
"""A built-in event of the main namespace: ``(socket, args, ack id)``."""


class Mover(Protocol):
    """Moves a session to the worker that owns a room (``handoff.Handoff``, with workers)."""

    def offer(self, socket: Socket, room: str, ack_id: int | None) -> bool:
        """Called for an authorized join.  True: the session is on its way to the room's
        owner, which answers the join (or, if the move fails, this worker answers it)."""
        ...


ANONYMOUS = Principal(user_id="", rooms=("*",), publish=("*",), expires_at=None, claims={})


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
    connects_in_flight: int = 16  # namespace connects at once; see docs/operations.md


class SocketServer:
    """Creates a :class:`Client` for every new connection and holds what they share."""

    def __init__(
        self,
        app: Application,
        hub: Hub,
        broker: Broker,
        authenticator: Authenticator | None,
        metrics: Metrics,
        tasks: TaskSet,
        options: SocketOptions,
        subscriptions: Subscriptions,
    ) -> None:
        self.subscriptions = subscriptions
        self.app = app
        self.hub = hub
        self.broker = broker
        self.auth = authenticator
        self.metrics = metrics
        self.tasks = tasks
        self.options = options
        self.sockets: dict[SocketId, Socket] = {}
        self.session_writer = SessionWriter(broker, metrics, tasks)
        self.handoff: Mover | None = None
        """With several workers: moves a socket to the worker that owns its first room."""
        self.builtins: Mapping[Any, BuiltinEvent] = {}
        """The built-in events of the main namespace (``events.BUILTINS``, set by the node)."""
        self.connecting = asyncio.Semaphore(options.connects_in_flight)

    def client(self, conn: Connection) -> Client:
        return Client(self, conn)

    def drop(self, reason: str, detail: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        log.info("dropped message (%s): %s", reason, detail)

    # -- broker delivery: the hot path -----------------------------------------------------------
    def deliver(self, publication: Publication) -> None:
        sent = self.hub.broadcast(
            ("/", publication.room),
            publication.event,
            publication.data,
            offset=publication.offset if self.options.recovery_ms else None,
            publication_id=publication.id,
            exclude=publication.exclude_sid,
        )
        self.metrics.broadcasts.inc()
        self.metrics.delivered.inc(sent)
        if publication.published_at_ms:
            lag = time.time() - publication.published_at_ms / 1000
            self.metrics.publish_latency.observe(max(lag, 0.0))

    # -- recovery state ----------------------------------------------------------------------------
    def save_session(self, socket: Socket, ttl_ms: int, *, final: bool = False) -> None:
        """Queue the socket's recovery state.  A live socket's state is serialised when the
        writer runs, so a burst of joins costs one serialisation of its rooms, not one per join;
        a ``final`` state (the socket is closing and will forget its rooms) is made now."""
        if not socket.pid or not self.options.recovery_ms:
            return
        if final:
            state = socket.recovery_state()
            self.session_writer.put(socket.session_key, lambda: state, ttl_ms)
        else:
            self.session_writer.put(socket.session_key, socket.recovery_state, ttl_ms)

    def forget_session(self, socket: Socket) -> None:
        if socket.pid and self.options.recovery_ms:
            self.session_writer.put(socket.session_key, None, 0)


class Client:
    """The Socket.IO side of one connection."""

    __slots__ = (
        "_connect_timer",
        "_decoder",
        "_pending",
        "_replaying",
        "conn",
        "server",
        "sockets",
    )

    def __init__(self, server: SocketServer, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.sockets: dict[str, Socket] = {}
        self._pending: dict[str, list[Packet]] = {}
        """Packets that arrived while their namespace's CONNECT was being processed."""
        self._replaying = False
        self._decoder = Decoder(server.options.limits)
        self._connect_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            server.options.connect_timeout_ms / 1000, self._connect_timed_out
        )

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if not self.sockets:
            self.server.metrics.connections_refused.labels("connect_timeout").inc()
            self.conn.close("connect timeout: no namespace connected")

    def send(self, packet: Packet) -> None:
        self.conn.send_messages(packet.serialize())

    # -- moving between workers (``handoff``) -----------------------------------------------------
    @property
    def settled(self) -> bool:
        """Nothing in flight that only this process could finish: one connected namespace, no
        namespace connecting, no binary packet half received."""
        return (
            len(self.sockets) == 1
            and not self._pending
            and not self._replaying
            and self._decoder.idle
        )

    def resume(self, sid: SocketId, pid: str, auth: dict[str, Any], principal: Principal) -> Socket:
        """Restore the main-namespace socket of a session that moved here from another worker."""
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        namespace = self.server.app.namespaces["/"]
        socket = Socket(self, namespace, principal, auth, sid=sid, pid=pid)
        socket.connected_at(save=False)
        return socket

    def detach(self) -> None:
        """The session moved to another worker: forget its sockets here, saving and announcing
        nothing (they live on over there)."""
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        for socket in self.sockets.values():
            socket.detach()
        self.sockets.clear()

    # -- EngineHandler ----------------------------------------------------------------------------
    def on_message(self, message: str | bytes) -> None:
        try:
            packet = self._decoder.feed(message)
            if packet is not None:
                self._dispatch(packet)
        except ProtocolError as error:
            self.server.metrics.protocol_errors.labels(error.reason).inc()
            log.info("closing %s: %s", self.conn.sid, error)
            self.conn.close(f"protocol error: {error}")

    def on_close(self, reason: str) -> None:
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        for socket in list(self.sockets.values()):
            # A transport that ends, even by the client's Engine.IO close packet, is recoverable;
            # a deliberate leave is the Socket.IO DISCONNECT packet, handled in _dispatch.
            socket.closed(reason, client_initiated=False)
        self.sockets.clear()

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, packet: Packet) -> None:
        kind = packet.type
        nsp = packet.namespace
        if kind is PacketType.CONNECT:
            if nsp in self.sockets or nsp in self._pending:
                raise SocketIOError(f"namespace {nsp[:40]} is already connected")
            self._pending[nsp] = []
            self.server.tasks.spawn(self._connect(nsp, packet.data), name=f"connect-{nsp}")
            return
        pending = self._pending.get(nsp)
        if pending is not None:
            pending.append(packet)
            return
        socket = self.sockets.get(nsp)
        if socket is None:
            self.server.drop("namespace_not_connected", f"{kind.name} for namespace {nsp[:40]}")
            return
        if kind is PacketType.DISCONNECT:
            socket.closed("client namespace disconnect", client_initiated=True)
        elif kind in (PacketType.EVENT, PacketType.BINARY_EVENT):
            socket.on_event(packet.data, packet.id)
        elif kind in (PacketType.ACK, PacketType.BINARY_ACK):
            socket.on_ack(packet.id, packet.data)
        else:
            raise SocketIOError(f"unexpected {kind.name} packet from a client")

    async def _connect(self, nsp: str, payload: dict[str, Any] | None) -> None:
        try:
            async with self.server.connecting:
                socket = await self._accept(nsp, payload or {})
        finally:
            queued = self._pending.pop(nsp, [])
        if socket is None or self.conn.closed:
            return
        self._replaying = True  # in order with each other: none of them moves the session
        try:
            for packet in queued:
                self._dispatch(packet)
        finally:
            self._replaying = False
        for reg in socket.namespace.connect:
            await reg.handler(socket)

    async def _accept(self, nsp: str, auth: dict[str, Any]) -> Socket | None:
        server = self.server
        namespace = server.app.namespaces.get(nsp)
        if namespace is None:
            self._refuse(nsp, {"message": "Invalid namespace"}, "invalid_namespace")
            return None
        principal = ANONYMOUS
        if server.auth is not None and server.options.auth_required:
            req = self.conn.request
            try:
                principal = await server.auth.authenticate(
                    token_from_request(auth, req.headers, req.query)
                )
            except AuthError as error:
                self._refuse(nsp, connect_error_payload(error.code, str(error)), error.code)
                return None
        if self.conn.closed:
            return None
        recovered = await self._recover(nsp, auth, principal)
        socket = recovered or Socket(self, namespace, principal, auth)
        try:
            for reg in namespace.before_connect:
                await reg.handler(socket, auth)
        except ConnectRefusedError as refused:
            socket.abandon_recovery()
            self._refuse(nsp, connect_error_payload(refused.code, refused.message), refused.code)
            return None
        except Exception:  # the app's hook: release the socket, log, count (as a refusal), answer
            socket.abandon_recovery()
            log.exception("before_connect handler failed on %s", self.conn.sid)
            self._refuse(
                nsp,
                connect_error_payload("internal_error", "the connect handler failed"),
                "internal_error",
            )
            return None
        if self.conn.closed:
            socket.abandon_recovery()
            return None
        socket.connected_at()
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        answer: dict[str, Any] = {"sid": socket.id}
        if socket.pid:
            answer["pid"] = socket.pid
        self.send(Packet(PacketType.CONNECT, nsp, answer))
        if recovered is not None:
            socket.finish_recovery()
        return socket

    def _refuse(self, nsp: str, payload: dict[str, Any], code: str) -> None:
        self.server.metrics.auth_failures.labels(code).inc()
        log.info("refused namespace %s on %s: %s", nsp[:40], self.conn.sid, payload.get("message"))
        self.send(Packet(PacketType.CONNECT_ERROR, nsp, payload))

    async def _recover(self, nsp: str, auth: dict[str, Any], principal: Principal) -> Socket | None:
        """Restore a disconnected socket from ``auth["pid"]`` / ``auth["offset"]`` if complete."""
        server = self.server
        pid, offset = auth.get("pid"), auth.get("offset")
        if not server.options.recovery_ms or nsp != "/" or not isinstance(pid, str):
            return None
        if PID_RE.match(pid) is None:
            server.metrics.recoveries.labels("bad_pid").inc()
            log.info("recovery refused: malformed pid %r", pid[:40])
            return None
        if not isinstance(offset, str):
            offset = "0"
        try:
            after = parse_offset(offset)
            raw = await server.broker.take_session(session_key(pid, principal.user_id))
        except (OffsetError, BrokerError) as exc:
            server.metrics.recoveries.labels("failed").inc()
            log.info("recovery refused: %s", exc)
            return None
        if raw is None:
            server.metrics.recoveries.labels("unknown_session").inc()
            return None
        try:
            state = orjson.loads(raw)
            user, sid, saved_rooms = state["user"], state["sid"], state["rooms"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            server.metrics.recoveries.labels("bad_state").inc()
            log.warning("recovery state of %s is unreadable: %r", pid[:40], exc)
            return None
        if not isinstance(sid, str) or not isinstance(saved_rooms, list):
            server.metrics.recoveries.labels("bad_state").inc()
            return None
        if user != principal.user_id:
            server.metrics.recoveries.labels("user_mismatch").inc()
            return None
        namespace = server.app.namespaces["/"]
        socket = Socket(self, namespace, principal, auth, sid=SocketId(sid), pid=pid)
        rooms = [r for r in saved_rooms if isinstance(r, str) and principal.may_join(r)]
        for room in rooms:
            server.hub.hold(socket, ("/", room))
        try:
            for room in rooms:
                await server.subscriptions.wait(room)
            histories: list[History] = [await server.broker.history(r, offset) for r in rooms]
        except BrokerError as exc:
            histories = [History(complete=False)]
            log.info("recovery history unavailable: %s", exc)
        if not all(h.complete for h in histories):
            for room in rooms:
                server.hub.release(socket, ("/", room))
            server.metrics.recoveries.labels("incomplete").inc()
            return None
        missed = sorted(
            (p for h in histories for p in h.publications if p.exclude_sid != socket.id),
            key=lambda p: parse_offset(p.offset),
        )
        socket.recovering = (rooms, missed, after)
        server.metrics.recoveries.labels("recovered").inc()
        return socket


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
        "id",
        "namespace",
        "owed",
        "pid",
        "principal",
        "recovering",
        "rooms",
    )

    def __init__(
        self,
        client: Client,
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
        recovery = client.server.options.recovery_ms and namespace.name == "/"
        self.pid = pid or (secrets.token_urlsafe(15) if recovery else "")
        self.rooms: set[str] = set()
        self.connected = False
        self.recovering: tuple[list[str], list[Publication], tuple[int, int]] | None = None
        self._acks: dict[int, asyncio.Future[list[Any]]] = {}
        self._ack_seq = 0
        self._expiry: asyncio.TimerHandle | None = None
        self.owed = 0
        """Tasks running that will answer the client (an ack): the socket must not move."""

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    @property
    def session_key(self) -> str:
        """Where this socket's recovery state is kept in the broker (see :func:`session_key`)."""
        return session_key(self.pid, self.principal.user_id)

    def recovery_state(self) -> bytes:
        """What a reconnecting client needs to recover this socket (see ``Client._recover``)."""
        # json, not orjson: orjson's result keeps a 4 KiB buffer, and states are held for minutes
        return json.dumps(
            {"sid": self.id, "user": self.principal.user_id, "rooms": sorted(self.rooms)},
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
        self.client.sockets[self.namespace.name] = self
        server.sockets[self.id] = self
        server.metrics.sockets.inc()
        expires = self.principal.expires_at
        if expires is not None:
            delay = max(expires - time.time(), 0.0)
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)
        if self.recovering is None and save:
            server.save_session(self, server.options.recovery_ms)

    def detach(self) -> None:
        """See :meth:`Client.detach`."""
        self._unregister()

    def _unregister(self) -> None:
        """No longer connected on this worker: out of the server's sockets, no expiry timer."""
        server = self.client.server
        self.connected = False
        server.sockets.pop(self.id, None)
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
                self.client.server.hub.release(self, ("/", room))

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
            self.emit(publication.event, publication.data, publication.offset)
            replayed[publication.room] = max(
                replayed[publication.room], parse_offset(publication.offset)
            )
        for room in rooms:
            self.rooms.add(room)
            hub.settle(self, ("/", room), replayed[room], seen)
        server = self.client.server
        server.save_session(self, server.options.recovery_ms)

    def _token_expired(self) -> None:
        self._expiry = None
        self.client.server.metrics.disconnects.labels("token_expired").inc()
        self.emit("roomcast:disconnect", {"code": "token_expired", "message": "token expired"})
        self.disconnect()

    def disconnect(self) -> None:
        """Server-side disconnect of this namespace (the client will not reconnect by itself)."""
        if self.connected:
            self.client.send(Packet(PacketType.DISCONNECT, self.namespace.name))
            self.closed("server namespace disconnect", client_initiated=True)

    def closed(self, reason: str, *, client_initiated: bool) -> None:
        if not self.connected:
            return
        self._unregister()
        client = self.client
        server = client.server
        client.sockets.pop(self.namespace.name, None)
        for room in self.rooms:
            server.hub.leave(self, (self.namespace.name, room))
        if client_initiated or reason.startswith("protocol error"):
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
            self.client.send(Packet(PacketType.EVENT, self.namespace.name, [event, *args]))
        else:
            self.client.server.drop("socket_disconnected", f"event {event!r} for {self.id}")

    async def call(self, event: str, *args: Any) -> list[Any]:
        """Send an event that asks for an ack; return the ack's arguments.

        Raises ``TimeoutError`` after the configured ack timeout; wrap the call in
        ``asyncio.timeout()`` for a shorter one.
        """
        self._ack_seq += 1
        ack_id = self._ack_seq
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        self.client.send(Packet(PacketType.EVENT, self.namespace.name, [event, *args], ack_id))
        try:
            async with asyncio.timeout(self.client.server.options.ack_timeout_s):
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

    def leave(self, room: str) -> None:
        server = self.client.server
        if server.hub.leave(self, (self.namespace.name, room)):
            self.rooms.discard(room)
            server.save_session(self, server.options.recovery_ms)

    # -- client events ----------------------------------------------------------------------------
    def on_event(self, data: list[Any], ack_id: int | None) -> None:
        server = self.client.server
        server.metrics.client_events.inc()
        name, args = data[0], data[1:]
        registered = self.namespace.events.get(name) if isinstance(name, str) else None
        if registered is not None:
            self._run(registered, name, args, ack_id)
            return
        builtin = server.builtins.get(name) if self.namespace.name == "/" else None
        if builtin is not None:
            builtin(self, args, ack_id)
            return
        if isinstance(name, str) and name in server.options.upstream_events:
            self.answer_later(self._upstream(name, args, ack_id), f"upstream-{self.id}")
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
        self.answer_later(
            self._call_handler(registered.handler(self, *args), ack_id), f"event-{name}"
        )

    async def _call_handler(self, call: Coroutine[Any, Any, Any], ack_id: int | None) -> None:
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

    async def _upstream(self, name: str, args: list[Any], ack_id: int | None) -> None:
        server = self.client.server
        fields = {
            "event": name,
            "data": orjson.dumps(args[0] if len(args) == 1 else args).decode(),
            "user_id": self.user_id,
            "sid": self.id,
            "ts": str(int(time.time() * 1000)),
        }
        try:
            entry_id = await server.broker.append_upstream(fields)
        except BrokerError as exc:
            server.drop("upstream_unavailable", f"event {name!r} from {self.id}: {exc}")
            if ack_id is not None:
                self.ack(ack_id, ack_error("unavailable", "upstream stream unavailable, retry"))
            return
        if ack_id is not None:
            self.ack(ack_id, {"ok": True, "id": entry_id})
