"""The composition root: settings -> auth, broker, hub, metrics, endpoints; start, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket as socketlib
from typing import Any

from roomcast.admin import Admin
from roomcast.app import Application
from roomcast.auth import Authenticator, AuthSettings
from roomcast.broker.base import (
    Broker,
    BrokerError,
    DeliveryHandler,
    PayloadCheck,
    Publication,
    PublishRequest,
    PublishResult,
    UserQuota,
)
from roomcast.broker.memory import MemoryBroker
from roomcast.broker.topics import topic
from roomcast.cluster import Cluster
from roomcast.config import Settings, ops_address
from roomcast.connection import Flusher
from roomcast.engine import EngineOptions, EngineServer
from roomcast.events import BUILTINS, upstream_event
from roomcast.handoff import Handoff
from roomcast.http.access import Access
from roomcast.http.peers import peer_path
from roomcast.http.routes import Router
from roomcast.http.server_api import ServerApiRoutes
from roomcast.hub import Hub, RoomKey
from roomcast.limits import Rate, SocketRates
from roomcast.metrics import BrokerCollector, Metrics
from roomcast.protocol.parser import parser_named
from roomcast.protocol.socketio import Limits
from roomcast.schemas import EventSchemas, InvalidPayloadError, SchemaError
from roomcast.sockets import SocketOptions, SocketServer
from roomcast.subscriptions import Subscriptions
from roomcast.tasks import TaskSet
from roomcast.tracing import setup as setup_tracing
from roomcast.transport import listener
from roomcast.transport.admission import Admission
from roomcast.transport.http import HttpConnection
from roomcast.transport.limits import ClientAddresses, HttpLimits

log = logging.getLogger("roomcast.node")

FLUSH_S = 5.0
"""The longest a drain waits for recovery states to be written after the last client left
(inside the manifests' margin beside the drain settings)."""

SHUTDOWN_REASON = "server shutting down"
BACKLOG = 4096
"""The kernel's accept queue (capped by net.core.somaxconn)."""


def make_broker(settings: Settings, payload_check: PayloadCheck | None = None) -> Broker:
    if settings.redis_url:
        from roomcast.broker.redis import RedisBroker

        return RedisBroker(
            settings.redis_url,
            prefix=settings.redis_prefix,
            history_size=settings.history_size,
            history_ttl_ms=settings.history_ttl_ms,
            idempotency_window_ms=settings.idempotency_window_ms,
            upstream_stream=settings.upstream_stream or None,
            payload_check=payload_check,
        )
    return MemoryBroker(
        history_size=settings.history_size,
        history_ttl_ms=settings.history_ttl_ms,
        idempotency_window_ms=settings.idempotency_window_ms,
    )


def load_schemas(settings: Settings, app: Application | None = None) -> EventSchemas:
    """The ``--event-schemas`` file, compiled; an event may not also have a schema in the app
    (which of the two would win is not obvious, so neither does)."""
    schemas = (
        EventSchemas.load(settings.event_schemas) if settings.event_schemas else EventSchemas()
    )
    for namespace in app.namespaces.values() if app is not None else ():
        for event, registered in namespace.events.items():
            if registered.schema is not None and event in schemas:
                raise SchemaError(
                    f"event {event!r} has a schema both in event_schemas "
                    f"{settings.event_schemas!r} and in its app handler; keep one"
                )
    return schemas


def make_authenticator(settings: Settings) -> Authenticator | None:
    if not (settings.jwt_secret or settings.jwt_public_key_file or settings.jwks_url):
        return None
    return Authenticator(
        AuthSettings(
            secret=settings.jwt_secret or None,
            public_key_file=settings.jwt_public_key_file or None,
            jwks_url=settings.jwks_url or None,
            jwks_cache_seconds=settings.jwks_cache_seconds,
            algorithms=settings.jwt_algorithms,
            issuer=settings.jwt_issuer or None,
            audience=settings.jwt_audience or None,
            require_exp=settings.jwt_require_exp,
        )
    )


class Node:
    def __init__(
        self,
        settings: Settings,
        app: Application | None = None,
        *,
        broker: Broker | None = None,
        metrics: Metrics | None = None,
        worker: tuple[int, tuple[str, ...]] | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.app = app or Application()
        self.metrics = metrics or Metrics()
        self.tasks = TaskSet(on_error=self._task_failed)
        self.schemas = load_schemas(settings, self.app)
        self.broker = broker or make_broker(
            settings, self._check_publication if self.schemas else None
        )
        self.auth = make_authenticator(settings)
        self.tracing = setup_tracing(settings.tracing)
        """OpenTelemetry spans, or None when tracing is off (see :mod:`roomcast.tracing`)."""
        self.metrics.registry.register(BrokerCollector(self.broker))
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        self.subscriptions = Subscriptions(self.broker, self.tasks)
        self.flusher = Flusher()
        parser = parser_named(settings.parser)
        self.hub = Hub(self._first_member, self._last_member, self.flusher, parser)
        self.sockets = SocketServer(
            self.app,
            self.hub,
            self.broker,
            self.auth,
            self.metrics,
            self.tasks,
            SocketOptions(
                connect_timeout_ms=settings.connect_timeout_ms,
                auth_required=settings.auth_required,
                recovery_ms=settings.recovery_max_disconnection_ms,
                upstream_events=settings.upstream_events,
                max_rooms=settings.max_rooms_per_socket,
                limits=Limits(settings.max_attachments, settings.max_nesting),
                event_schemas=self.schemas,
                parser=parser,
                rates=SocketRates(
                    events=Rate.of(settings.event_rate, settings.event_burst),
                    joins=Rate.of(settings.join_rate, settings.join_burst),
                    disconnect_factor=settings.rate_limit_disconnect,
                ),
                user_quota=UserQuota(
                    per_window=settings.user_connect_rate,
                    window_ms=int(settings.user_connect_window_s * 1000),
                    concurrent=settings.max_connections_per_user,
                    ttl_ms=int(settings.user_connections_ttl_s * 1000),
                ),
            ),
            self.subscriptions,
        )
        # Upstream events first: a built-in of the same name wins, as it always did.
        upstream = {name: upstream_event(name) for name in settings.upstream_events}
        self.sockets.builtins = {**upstream, **BUILTINS}
        self.sockets.tracing = self.tracing
        self.cluster = Cluster(
            self.broker,
            self.sockets,
            self.metrics,
            self.tasks,
            revocation_ttl_s=settings.revocation_ttl_s,
            publish=self.publish,
            schemas=self.schemas,
        )
        self.broker.on_control(self.cluster.on_message)
        self.admin: Admin | None = None
        if settings.admin_username:
            self.admin = Admin(
                settings,
                self.sockets,
                self.cluster,
                self.metrics,
                self.tasks,
                lambda: (conn for engine in self.engines for conn in engine.sessions.values()),
            )
        self.engine_options = EngineOptions(
            ping_interval_ms=settings.ping_interval_ms,
            ping_timeout_ms=settings.ping_timeout_ms,
            max_payload=settings.max_payload,
            outbound_buffer_limit=settings.outbound_buffer_limit,
            allowed_origins=settings.allowed_origins,
            max_connections=settings.max_connections,
            worker_index=worker[0] if worker else 0,
            worker_sockets=worker[1] if worker else (),
        )
        self.admission = Admission()
        self.engine = EngineServer(
            self.engine_options, self.sockets.client, self.metrics, self.flusher, self.admission
        )
        self.engines = [self.engine]
        if self.admin is not None:
            self.engine.on_upgrade = self.admin.upgraded
        self.router = Router(
            metrics=self.metrics,
            tasks=self.tasks,
            publish=self.publish,
            api_key=settings.api_key,
            readiness=self.readiness,
            max_payload=settings.max_payload,
            worker=f"{worker[0]:02d}" if worker else "",
            namespaces=self.app.namespaces,
            peer_sockets={
                f"{index:02d}": peer_path(path)
                for index, path in enumerate(worker[1])
                if index != worker[0]
            }
            if worker
            else None,
            access=Access.of(
                ops_listen=settings.ops_listen,
                metrics_key=settings.metrics_key,
                production=settings.production,
                api_key=settings.api_key,
            ),
            api_rate=Rate.of(settings.api_rate, settings.api_burst),
            refusals=self.sockets.refusals,
        )
        self.router.mount("/socket.io/", self.engine)
        self.router.server_api = ServerApiRoutes(
            self.app.of,
            revoke=self.cluster.revoke,
            check_key=self.router.check_key,
            tasks=self.tasks,
            metrics=self.metrics,
            max_payload=settings.max_payload,
            schemas=self.schemas,
        )
        self.handoff: Handoff | None = None
        if worker is not None and len(worker[1]) > 1 and settings.room_affinity:
            self.handoff = Handoff(
                worker[0], worker[1], self.engine, self.sockets.session_writer, self.metrics
            )
            self.sockets.handoff = self.handoff
        self._listeners: list[listener.Listener] = []
        self._unix: asyncio.Server | None = None
        self._peer: asyncio.Server | None = None
        self._ops: asyncio.Server | None = None
        self._addresses: ClientAddresses | None = None
        self.started = False
        self.draining = False

    def _task_failed(self, name: str, error: BaseException) -> None:
        """Count a failed task by kind (its name up to the first ``-``; already logged)."""
        self.metrics.task_failures.labels(name.split("-", 1)[0]).inc()

    # -- wiring -----------------------------------------------------------------------------------
    def _first_member(self, key: RoomKey) -> None:
        self.metrics.rooms.inc()
        self.subscriptions.want(topic(*key))

    def _last_member(self, key: RoomKey) -> None:
        self.metrics.rooms.dec()
        self.subscriptions.drop(topic(*key))

    def mount_engine(self, path: str, factory: Any) -> EngineServer:
        """Serve a raw Engine.IO application (``factory(conn) -> EngineHandler``) at ``path``."""
        engine = EngineServer(
            self.engine_options, factory, self.metrics, self.flusher, self.admission
        )
        self.engines.append(engine)
        self.router.mount(path, engine)
        return engine

    async def publish(self, request: PublishRequest) -> PublishResult:
        """The one publish path of the HTTP API, the CLI and in-process callers.

        Raise :class:`InvalidPayloadError` if the event has a schema that ``data`` fails."""
        self.schemas.check(request.event, request.data)
        if self.tracing is None:
            return await self.broker.publish(request)
        return await self.tracing.publish(
            self.broker.publish, request, source="http", instance=self.broker.instance_id
        )

    def _check_publication(self, publication: Publication) -> str | None:
        """The broker's :data:`PayloadCheck`: a stream entry whose data fails its schema."""
        issues = self.schemas.issues(publication.event, publication.data)
        return None if issues is None else str(InvalidPayloadError(publication.event, issues))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        state = self.broker.state
        ready = self.started and not self.draining and self.broker.ready
        return ready, {
            "broker": state.value,
            "draining": self.draining,
            "connections": sum(len(e.sessions) for e in self.engines),
        }

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self, sock: socketlib.socket | None = None) -> None:
        deliver: DeliveryHandler = self.sockets.deliver  # off: nothing between broker and hub
        if self.tracing is not None:
            deliver = self.tracing.delivery(self.sockets.deliver, self.broker.instance_id)
        await self.broker.start(deliver, batch=self.flusher.batch)
        self.app.attach(self.cluster)  # before the first client: handlers may use app.of()
        try:
            self.sockets.revocations.load(await self.broker.revocations())
        except BrokerError as exc:  # the sync task tries again
            log.warning("could not load revocations: %s", exc)
        loop = asyncio.get_running_loop()
        settings = self.settings
        limits = HttpLimits(
            body_bytes=settings.max_payload + 64 * 1024,
            head_bytes=settings.http_max_head_bytes,
            headers=settings.http_max_headers,
            head_timeout_s=settings.http_head_timeout_s,
            idle_timeout_s=settings.http_idle_timeout_s,
            connections_per_ip=settings.max_connections_per_ip,
            trusted_proxies=frozenset(settings.trusted_proxies),
        )
        refused = self.metrics.http_refused
        addresses = ClientAddresses(limits, lambda reason: refused.labels(reason).inc())
        self._addresses = addresses

        def factory() -> HttpConnection:
            return HttpConnection(self.router, addresses)

        if sock is not None:
            sock.listen(BACKLOG)
            sockets = [sock]
        else:
            sockets = listener.bind(
                settings.host, settings.port, backlog=BACKLOG, reuse_port=settings.workers > 1
            )
        self._listeners = [
            listener.Listener(s, factory, self.tasks, lambda reason: refused.labels(reason).inc())
            for s in sockets
        ]
        if self.settings.ops_listen:
            host, port = ops_address(self.settings.ops_listen)
            self._ops = await loop.create_server(
                lambda: HttpConnection(self.router.ops, addresses),
                host,
                port,
                reuse_port=self.settings.workers > 1,
            )
        if self.worker is not None:
            own = self.worker[1][self.worker[0]]
            self._unix = await loop.create_unix_server(factory, own)
            self._peer = await loop.create_unix_server(
                lambda: HttpConnection(self.router.peer), peer_path(own)
            )
        if self.handoff is not None:
            self.handoff.listen()
        if self.settings.recovery_max_disconnection_ms:
            self.tasks.spawn(self._touch_sessions(), name="touch-sessions")
        self.tasks.spawn(self._sync_revocations(), name="sync-revocations")
        if settings.max_connections_per_user:
            self.tasks.spawn(self.sockets.users.run(self._held), name="limits-keep")
        for hook in self.app.startup:
            self.tasks.spawn(hook(), name=f"startup-{getattr(hook, '__name__', 'hook')}")
        self.started = True
        log.info("listening on %s", ", ".join(str(s.socket.getsockname()) for s in self._listeners))
        if self._ops is not None:
            log.info(
                "operational endpoints on %s",
                ", ".join(str(s.getsockname()) for s in self._ops.sockets),
            )

    @property
    def port(self) -> int:
        assert self._listeners
        port: int = self._listeners[0].socket.getsockname()[1]
        return port

    def _held(self) -> list[tuple[str, str]]:
        """This worker's live sockets as their users' held connections (``limits``)."""
        return [(s.user_id, s.hold) for s in self.sockets.sockets.values()]

    async def _sync_revocations(self) -> None:
        """Reload revocations from the broker now and then: an instance that missed one (cut
        from the broker when it was sent) still refuses the token, and ends its sockets."""
        while True:
            await asyncio.sleep(self.settings.revocation_sync_s)
            try:
                self.sockets.revocations.load(await self.broker.revocations())
            except BrokerError as exc:
                log.warning("could not reload revocations: %s", exc)
            # Also sockets that connected while a revocation of theirs was on its way.
            self.cluster.kick_revoked()

    @property
    def ops_port(self) -> int | None:
        """The ops listener's port (``--ops-listen``), or None without one."""
        if self._ops is None:
            return None
        port: int = self._ops.sockets[0].getsockname()[1]
        return port

    async def _touch_sessions(self) -> None:
        """Keep live sockets' recovery state alive, so it survives an instance that is killed."""
        ttl = self.settings.recovery_max_disconnection_ms
        while True:
            await asyncio.sleep(ttl / 3000)
            pids = [s.session_key for s in self.sockets.sockets.values() if s.pid]
            if pids:
                try:
                    await self.broker.touch_sessions(pids, ttl)
                except BrokerError as exc:
                    self.metrics.recoveries.labels("touch_failed").inc()
                    log.warning("could not refresh recovery state: %s", exc)

    async def drain(self, hurry: asyncio.Event | None = None) -> None:
        """SIGTERM: let balancers and kubelets see it, then send clients elsewhere, gradually.

        1. ``/readyz`` answers 503 at once, while everyone is still served (new sessions too)
           for ``drain_delay_s``: health checks see it and stop sending new clients here.
        2. Clients are told to leave at a steady rate over ``drain_window_s`` (they reconnect
           through the balancer to the other instances and recover there); new sessions are
           refused with 503 from here on.
        3. Within ``drain_seconds``, the last clients leave (a polling one collects its CLOSE
           packet with its next poll) and their recovery states are written; then the listener
           closes.

        ``hurry`` set (a second signal) skips what is left of the delay and the window.
        """
        self.draining = True
        hurry = hurry or asyncio.Event()
        settings = self.settings
        log.info(
            "draining: not ready; clients are told to leave in %.1f s, over %.1f s",
            settings.drain_delay_s,
            settings.drain_window_s,
        )
        await _wait(hurry, settings.drain_delay_s)
        for engine in self.engines:
            engine.accepting = False
        told = await self._dismiss(settings.drain_window_s, hurry)
        log.info("draining: %d clients told to leave", told)
        try:
            async with asyncio.timeout(settings.drain_seconds):
                while any(e.sessions or e.awaiting_farewells() for e in self.engines):
                    if not hurry.is_set():
                        await _wait(hurry, 0.05)
                        continue
                    # Hurried: everyone goes now, and no farewell is waited for.
                    for engine in self.engines:
                        engine.close_all(SHUTDOWN_REASON)
                    if not any(e.sessions for e in self.engines):
                        break
                    await asyncio.sleep(0.05)  # always yield: clients must get to poll
        except TimeoutError:
            log.warning("drain: not finished within %ss", settings.drain_seconds)
        try:  # the recovery states of the sockets just closed, so clients recover elsewhere
            async with asyncio.timeout(FLUSH_S):
                await self.sockets.session_writer.flush()
        except TimeoutError:
            log.warning("drain: recovery states not all written")
        for each in self._listeners:
            each.close()

    async def _dismiss(self, window: float, hurry: asyncio.Event) -> int:
        """Tell every client to leave (:meth:`Connection.dismiss`), at a steady rate over
        ``window`` seconds (at once when it is 0 or ``hurry`` is set); return how many."""
        loop = asyncio.get_running_loop()
        queue = [(engine, conn) for engine in self.engines for conn in engine.sessions.values()]
        total = len(queue)
        started = loop.time()
        done = told = 0
        # One tick per close, but at most 100 ticks a second (a timer per close would cost more
        # than the closes) and at least 4: the rate stays steady over the window.
        tick = min(max(window / max(total, 1), 0.01), 0.25)
        while done < total:
            elapsed = loop.time() - started
            due = total
            if window > 0 and elapsed < window and not hurry.is_set():
                due = min(total, int(total * elapsed / window) + 1)
            while done < due:
                engine, conn = queue[done]
                done += 1
                if engine.sessions.get(conn.sid) is conn:  # not closed, nor moved to a worker
                    conn.dismiss(SHUTDOWN_REASON)
                    told += 1
            if done < total:
                await _wait(hurry, tick)
        # sessions that arrived meanwhile (handed over by another worker before it saw the drain)
        for engine in self.engines:
            for conn in list(engine.sessions.values()):
                if not conn.dismissing:
                    conn.dismiss(SHUTDOWN_REASON)
                    told += 1
        return told

    async def stop(self) -> None:
        if not self.draining:
            self.draining = True
            for engine in self.engines:
                engine.close_all("server stopped")
        for each in self._listeners:
            each.close()
        for server in (self._unix, self._peer, self._ops):
            if server is not None:
                server.close()
        if self._addresses is not None:
            self._addresses.close_lingering()
        if self.handoff is not None:
            self.handoff.close()
        await self.tasks.close()
        self.app.attach(None)
        await self.broker.stop()
        self.started = False


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``event`` is or gets set."""
    if seconds <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
