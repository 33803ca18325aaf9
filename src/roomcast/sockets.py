"""The Socket.IO v5 server: one :class:`Client` per connection, which connects the namespaces
of that connection as sockets (:mod:`roomcast.socket`); built-in events are in
:mod:`roomcast.events`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson

from roomcast.app import Application, ConnectRefusedError, Namespace
from roomcast.auth import Authenticator, AuthError, Principal, token_from_request
from roomcast.broker.base import Broker, BrokerError, History, Publication
from roomcast.broker.offsets import OffsetError, parse_offset
from roomcast.broker.topics import topic
from roomcast.connection import Connection
from roomcast.http.errors import connect_error_payload, connect_rate_limited
from roomcast.hub import Hub
from roomcast.limits import Refusals, UserConnections
from roomcast.metrics import Metrics
from roomcast.observer import Observer
from roomcast.protocol.errors import PayloadTooLargeError, ProtocolError, SocketIOError
from roomcast.protocol.socketio import Packet, PacketType
from roomcast.revocation import Revocations
from roomcast.sessions import PID_RE, SessionWriter, session_key
from roomcast.socket import (
    ANONYMOUS,
    BuiltinEvent,
    Mover,
    Socket,
    SocketOptions,
    hold_name,
)
from roomcast.subscriptions import Subscriptions
from roomcast.tasks import TaskSet
from roomcast.tracing import Tracing
from roomcast.types import SocketId

__all__ = ["Client", "Mover", "SocketOptions", "SocketServer"]

PRE_CONNECT_MAX_BYTES: Final = 64 * 1024
"""The largest message a connection may send before it has connected a namespace."""
PENDING_MAX_PACKETS: Final = 256
"""Packets a client may send for a namespace while its CONNECT is being processed."""
PENDING_MAX_NAMESPACES: Final = 8
"""Namespaces one client may be connecting at once."""
PENDING_MAX_BYTES: Final = 1024 * 1024
"""Bytes a client may send, attachments included, while a namespace connects."""

log = logging.getLogger("roomcast.sockets")


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
        self.refusals = Refusals(metrics)
        """Counts and logs what a rate limit refused (``roomcast.limits``)."""
        self.users = UserConnections(broker, metrics, tasks, options.user_quota, self.refusals)
        """New and concurrent connections per user."""
        self.revocations = Revocations()
        """Revoked users and token ids (kept in step by the node and the cluster)."""
        self.handoff: Mover | None = None
        """With several workers: moves a socket to the worker that owns its first room."""
        self.builtins: Mapping[Any, BuiltinEvent] = {}
        """The built-in events of the main namespace (``events.BUILTINS``, set by the node)."""
        self.tracing: Tracing | None = None
        """OpenTelemetry spans when tracing is on (set by the node)."""
        self.connecting = asyncio.Semaphore(options.connects_in_flight)
        self.internal: dict[str, Namespace] = {}
        """The gateway's own namespaces (the Admin UI's), beside the application's."""
        self.observer: Observer[Socket] | None = None
        """What watches sockets, while someone does (the Admin UI's recorder); else None."""

    def namespace(self, name: str) -> Namespace | None:
        """The application's namespace ``name``, or the gateway's own of that name."""
        return self.app.namespaces.get(name) or self.internal.get(name)

    def client(self, conn: Connection) -> Client:
        return Client(self, conn)

    def drop(self, reason: str, detail: str) -> None:
        self.metrics.dropped.labels(reason).inc()
        # %r: the detail may quote what a client sent, which must not forge log lines.
        log.info("dropped message (%s): %r", reason, detail)

    # -- broker delivery: the hot path -----------------------------------------------------------
    def deliver(self, publication: Publication) -> int:
        """Send ``publication`` to its room's local members; return how many it was sent to."""
        sent = self.hub.broadcast(
            (publication.namespace, publication.room),
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
        return sent

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
        "_pending_bytes",
        "_replaying",
        "conn",
        "server",
        "sockets",
    )

    def __init__(self, server: SocketServer, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.sockets: dict[str, Socket] = {}
        self._pending_bytes = 0
        self._pending: dict[str, list[Packet]] = {}
        """Packets that arrived while their namespace's CONNECT was being processed."""
        self._replaying = False
        self._decoder = server.options.parser.decoder(server.options.limits)
        self._connect_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            server.options.connect_timeout_ms / 1000, self._connect_timed_out
        )

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if not self.sockets:
            self.server.metrics.connections_refused.labels("connect_timeout").inc()
            self.conn.close("connect timeout: no namespace connected")

    def send(self, packet: Packet) -> None:
        self.conn.send_messages(self.server.options.parser.encode(packet))

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
            if self._pending:  # held until a namespace connects: one budget for all of it
                self._pending_bytes += len(message)
                if self._pending_bytes > PENDING_MAX_BYTES:
                    raise PayloadTooLargeError(
                        f"more than {PENDING_MAX_BYTES} bytes while a namespace connects"
                    )
            if not self.sockets and len(message) > PRE_CONNECT_MAX_BYTES:
                # Before any namespace is connected only a CONNECT (a token, some auth) comes:
                # a large message then is decoding work for nobody authenticated.
                raise PayloadTooLargeError(
                    f"{len(message)} bytes before a namespace is connected "
                    f"(at most {PRE_CONNECT_MAX_BYTES})"
                )
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
            namespace = self.server.namespace(nsp)
            if namespace is None:  # at once: no task, no wait for a connect slot
                self._refuse(nsp, {"message": "Invalid namespace"}, "invalid_namespace")
                return
            if len(self._pending) >= PENDING_MAX_NAMESPACES:
                raise SocketIOError(f"more than {PENDING_MAX_NAMESPACES} namespaces connecting")
            self._pending[nsp] = []
            self.server.tasks.spawn(
                self._connect(nsp, packet.data, slot=not namespace.internal),
                name=f"connect-{nsp}",
            )
            return
        pending = self._pending.get(nsp)
        if pending is not None:
            if len(pending) >= PENDING_MAX_PACKETS:
                raise SocketIOError(
                    f"more than {PENDING_MAX_PACKETS} packets while namespace {nsp[:40]} connects"
                )
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

    async def _connect(self, nsp: str, payload: dict[str, Any] | None, *, slot: bool) -> None:
        """Accept the namespace; with ``slot``, inside one of the server's connect slots (the
        gateway's own namespaces, whose login is not a token check, take none: their logins
        must never make clients wait)."""
        socket = None
        try:
            if slot:
                async with self.server.connecting:
                    socket = await self._accept(nsp, payload or {})
            else:
                socket = await self._accept(nsp, payload or {})
        finally:
            queued = self._pending.pop(nsp, [])
            if not self._pending:
                self._pending_bytes = 0
            if socket is None:
                self.server.users.abandoned(hold_name(self.conn.sid, nsp))
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
        namespace = server.namespace(nsp)
        if namespace is None:
            self._refuse(nsp, {"message": "Invalid namespace"}, "invalid_namespace")
            return None
        principal = ANONYMOUS
        if server.auth is not None and server.options.auth_required and not namespace.internal:
            req = self.conn.request
            try:
                principal = await server.auth.authenticate(
                    token_from_request(auth, req.headers, req.query)
                )
                server.revocations.check(principal)
            except AuthError as error:
                self._refuse(nsp, connect_error_payload(error.code, str(error)), error.code)
                return None
        if self.conn.closed:
            return None
        refusal = await server.users.admit(principal.user_id, hold_name(self.conn.sid, nsp))
        if refusal is not None:
            payload = connect_rate_limited(refusal.limit, refusal.retry_after_ms, refusal.message)
            self._refuse(nsp, payload, "rate_limited")
            return None
        recovered = None if namespace.internal else await self._recover(nsp, auth, principal)
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
        try:  # again: a revocation may have come while the connect waited
            server.revocations.check(socket.principal)
        except AuthError as error:
            socket.abandon_recovery()
            self._refuse(nsp, connect_error_payload(error.code, str(error)), error.code)
            return None
        socket.connected_at()
        server.users.connected(socket.hold)
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
        log.info(
            "refused namespace %s on %s: %s",
            nsp[:40],
            self.conn.sid,
            payload.get("message"),
            extra={"sid": self.conn.sid, "namespace": nsp[:40], "reason": code},
        )
        self.send(Packet(PacketType.CONNECT_ERROR, nsp, payload))

    async def _recover(self, nsp: str, auth: dict[str, Any], principal: Principal) -> Socket | None:
        """Restore a disconnected socket from ``auth["pid"]`` / ``auth["offset"]`` if complete."""
        server = self.server
        pid, offset = auth.get("pid"), auth.get("offset")
        if not server.options.recovery_ms or not isinstance(pid, str):
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
            saved_nsp = state.get("nsp", "/")
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
        if saved_nsp != nsp:
            server.metrics.recoveries.labels("namespace_mismatch").inc()
            log.info("recovery refused: session of %r offered to %r", saved_nsp, nsp[:40])
            return None
        namespace = server.app.namespaces[nsp]
        old = server.sockets.get(SocketId(sid))
        if old is not None:  # the old transport has not timed out yet: the session moves on
            server.metrics.recoveries.labels("superseded").inc()
            log.info("socket %s recovered on a new connection; its old one ends", sid[:40])
            old.supersede()
        socket = Socket(self, namespace, principal, auth, sid=SocketId(sid), pid=pid)
        rooms = [r for r in saved_rooms if isinstance(r, str) and principal.may_join(r)]
        for room in rooms:
            server.hub.hold(socket, (nsp, room))
        try:
            for room in rooms:
                await server.subscriptions.wait(topic(nsp, room))
            histories: list[History] = [
                await server.broker.history(topic(nsp, r), offset) for r in rooms
            ]
        except BrokerError as exc:
            histories = [History(complete=False)]
            log.info("recovery history unavailable: %s", exc)
        if not all(h.complete for h in histories):
            for room in rooms:
                server.hub.release(socket, (nsp, room))
            server.metrics.recoveries.labels("incomplete").inc()
            return None
        missed = sorted(
            (p for h in histories for p in h.publications if p.exclude_sid != socket.id),
            key=lambda p: parse_offset(p.offset),
        )
        socket.recovering = (rooms, missed, after)
        server.metrics.recoveries.labels("recovered").inc()
        return socket
