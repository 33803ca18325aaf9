"""The Engine.IO v4 endpoint: handshakes, polling requests, WebSocket attach and upgrade.

Every refusal is an :class:`EngineRequestError`; ``http/errors.py`` turns it into the response.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from roomcast.connection import Connection, EngineHandler, Flusher
from roomcast.http.errors import EngineErrorCode, EngineRequestError, engine_error_response
from roomcast.metrics import Metrics
from roomcast.protocol import engineio
from roomcast.protocol.engineio import PacketType
from roomcast.protocol.errors import EngineIOError, ProtocolError
from roomcast.transport.admission import Admission
from roomcast.transport.http import Exchange, Request
from roomcast.transport.websocket import text_frame
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId

log = logging.getLogger("roomcast.engine")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    ping_interval_ms: int = 25_000
    ping_timeout_ms: int = 20_000
    max_payload: int = 1_000_000
    outbound_buffer_limit: int = 4 * 1024 * 1024
    allowed_origins: tuple[str, ...] = ()
    """Empty or containing ``*`` allows any origin."""
    max_connections: int = 100_000
    worker_index: int = 0
    worker_sockets: tuple[str, ...] = ()
    """With several workers: the unix socket of each, to forward requests of their sessions."""


HandlerFactory = Callable[[Connection], EngineHandler]


class EngineServer:
    """Sessions of one Engine.IO endpoint (for example ``/socket.io/``)."""

    def __init__(
        self,
        options: EngineOptions,
        handler_factory: HandlerFactory,
        metrics: Metrics,
        flusher: Flusher,
        admission: Admission | None = None,
    ) -> None:
        """``admission``: where handshakes (new sessions) wait for their turn; without it they
        are handled as soon as they are read."""
        self.options = options
        self._admission = admission
        self._factory = handler_factory
        self._metrics = metrics
        self._flusher = flusher
        self.sessions: dict[SessionId, Connection] = {}
        self.farewells: dict[str, tuple[float, str]] = {}
        """Closed polling sessions whose CLOSE packet awaits the client's next poll."""
        self._farewell_order: deque[tuple[float, str]] = deque()
        """(expiry, sid) of the farewells in the order they were made: every farewell lives
        equally long, so the expired ones are always at the front."""
        self.accepting = True
        self.on_upgrade: Callable[[Connection], None] | None = None
        """Called when a polling session has moved to WebSocket (the Admin UI shows it)."""

    # -- HTTP entry point -------------------------------------------------------------------------
    def handle(self, request: Request, exchange: Exchange) -> None:
        admission = self._admission
        if admission is not None and request.method == "GET" and "sid" not in request.query:
            admission.submit(lambda: self._admitted(request, exchange))
            return
        self._handle(request, exchange)

    def _admitted(self, request: Request, exchange: Exchange) -> None:
        """A handshake's turn came (see ``Admission``); its client may have gone meanwhile."""
        if exchange.aborted:
            self._metrics.engine_request_errors.labels("gone_before_handshake").inc()
            return
        try:
            self._handle(request, exchange)
        except Exception:  # a loop callback's boundary: answer, log, count
            self._metrics.engine_request_errors.labels("internal_error").inc()
            log.exception("handshake failed")
            if not exchange.done:
                exchange.respond(500, "internal error")

    def _handle(self, request: Request, exchange: Exchange) -> None:
        cors = self._cors_headers(request)
        try:
            if cors is None:
                raise EngineRequestError(EngineErrorCode.FORBIDDEN, "origin not allowed", 403)
            if request.method == "OPTIONS" and not request.upgrade:
                exchange.respond(204, b"", cors + _preflight(request))
                return
            self._route(request, exchange, cors)
        except EngineRequestError as error:
            self._metrics.engine_request_errors.labels(error.code.name.lower()).inc()
            log.info("refused %s %s: %s", request.method, request.path, error.message)
            engine_error_response(exchange, error, cors or [])

    def _route(self, request: Request, exchange: Exchange, cors: list[tuple[str, str]]) -> None:
        query = request.query
        eio = query.get("EIO")
        if eio != "4":
            if eio is not None and eio.isdigit():
                raise EngineRequestError(
                    EngineErrorCode.UNSUPPORTED_PROTOCOL_VERSION,
                    f"unsupported protocol version EIO={eio[:8]}; only EIO=4 is served",
                )
            raise EngineRequestError(EngineErrorCode.BAD_REQUEST, "missing or invalid EIO")
        transport = query.get("transport")
        if transport not in ("polling", "websocket"):
            raise EngineRequestError(EngineErrorCode.TRANSPORT_UNKNOWN, "transport unknown")
        sid = query.get("sid")
        if sid is not None and sid not in self.sessions:
            owner = self._owner(sid)
            if owner is not None:
                exchange.forward(request, owner)
                return
        if request.upgrade:
            if transport != "websocket":
                raise EngineRequestError(
                    EngineErrorCode.BAD_REQUEST, "upgrade needs transport=websocket"
                )
            self._websocket(request, exchange, SessionId(sid) if sid else None)
            return
        if transport != "polling":
            raise EngineRequestError(
                EngineErrorCode.BAD_REQUEST, "websocket transport needs an upgrade"
            )
        if sid is None:
            if request.method != "GET":
                raise EngineRequestError(
                    EngineErrorCode.BAD_HANDSHAKE_METHOD, "handshake must be GET"
                )
            conn = self._open(request)
            exchange.respond(200, "0" + self._open_payload(conn, ["websocket"]), cors)
            return
        found = self.sessions.get(SessionId(sid))
        if found is None and request.method == "GET" and sid in self.farewells:
            exchange.respond(200, self.farewells.pop(sid)[1], cors)
            return
        if found is None:
            raise EngineRequestError(EngineErrorCode.UNKNOWN_SID, "session id unknown")
        conn = found
        if conn.ws is not None:
            raise EngineRequestError(EngineErrorCode.BAD_REQUEST, "session uses websocket")
        if request.method == "GET":
            if conn.has_poll():
                conn.close("duplicate polling request", notify=False)
                raise EngineRequestError(EngineErrorCode.BAD_REQUEST, "duplicate polling request")
            conn.attach_poll(exchange, cors)
            return
        if request.method == "POST":
            self._post(conn, request, exchange, cors)
            return
        raise EngineRequestError(
            EngineErrorCode.BAD_REQUEST, f"method {request.method} not allowed"
        )

    def _post(
        self, conn: Connection, request: Request, exchange: Exchange, cors: list[tuple[str, str]]
    ) -> None:
        try:
            packets = engineio.decode_payload(request.body, max_payload=self.options.max_payload)
        except ProtocolError as error:
            self.protocol_error(conn, error)
            status = 413 if error.reason == "payload_too_large" else 400
            raise EngineRequestError(EngineErrorCode.BAD_REQUEST, str(error), status) from error
        exchange.respond(200, "ok", cors, content_type="text/html")
        for packet in packets:
            if conn.closed:
                break
            try:
                conn.receive(packet)
            except ProtocolError as error:
                self.protocol_error(conn, error)
                break

    def protocol_error(self, conn: Connection, error: ProtocolError) -> None:
        self._metrics.protocol_errors.labels(error.reason).inc()
        log.info("closing %s: %s", conn.sid, error, extra={"sid": conn.sid, "reason": error.reason})
        conn.close(f"protocol error: {error}", notify=False)

    # -- WebSocket --------------------------------------------------------------------------------
    def _websocket(self, request: Request, exchange: Exchange, sid: SessionId | None) -> None:
        key = request.headers.get("sec-websocket-key")
        if not key or request.headers.get("upgrade", "").lower() != "websocket":
            raise EngineRequestError(EngineErrorCode.BAD_REQUEST, "invalid websocket handshake")
        if sid is None:
            conn = self._open(request)
            ws = exchange.accept_websocket(_Peer(self, conn), key, self.options.max_payload, [])
            conn.use_websocket(ws)
            conn.send_packet(PacketType.OPEN, self._open_payload(conn, []))
            return
        existing = self.sessions.get(sid)
        if existing is None:
            raise EngineRequestError(EngineErrorCode.UNKNOWN_SID, "session id unknown")
        conn = existing
        if conn.ws is not None or conn.upgrading:
            # Refused after the handshake, so that WebSocket clients see a plain close.
            self._metrics.engine_request_errors.labels("already_upgraded").inc()
            log.info("closing a second websocket for session %s", sid, extra={"sid": sid})
            ws = exchange.accept_websocket(_Ignored(), key, self.options.max_payload, [])
            ws.close(1008, "session already upgraded")
            return
        probe = _Probe(self, conn)
        probe.ws = exchange.accept_websocket(probe, key, self.options.max_payload, [])

    def _owner(self, sid: str) -> str | None:
        """The unix socket of the worker that owns ``sid``, if it is another worker."""
        sockets = self.options.worker_sockets
        if not sockets or not sid[:2].isdigit():
            return None
        index = int(sid[:2])
        if index == self.options.worker_index or index >= len(sockets):
            return None
        return sockets[index]

    # -- sessions ---------------------------------------------------------------------------------
    def _open(self, request: Request) -> Connection:
        if not self.accepting:
            raise EngineRequestError(EngineErrorCode.FORBIDDEN, "server is draining", 503)
        if len(self.sessions) >= self.options.max_connections:
            self._metrics.connections_refused.labels("max_connections").inc()
            raise EngineRequestError(EngineErrorCode.FORBIDDEN, "too many connections", 503)
        token = secrets.token_urlsafe(15)
        sid = SessionId(
            f"{self.options.worker_index:02d}{token}" if self.options.worker_sockets else token
        )
        conn = self.add_session(sid, request)
        conn.start_heartbeat()
        return conn

    def add_session(self, sid: SessionId, request: Request) -> Connection:
        """Register a session with its handler; no transport and no heartbeat yet (a new
        session, or one another worker opened and handed over: ``handoff``)."""
        conn = Connection(
            sid,
            request,
            ping_interval=self.options.ping_interval_ms / 1000,
            ping_timeout=self.options.ping_timeout_ms / 1000,
            limit=self.options.outbound_buffer_limit,
            flusher=self._flusher,
            metrics=self._metrics,
            on_closed=self._closed,
        )
        self.sessions[sid] = conn
        self._metrics.connections.inc()
        self._metrics.connections_opened.inc()
        conn.handler = self._factory(conn)
        return conn

    def forget(self, conn: Connection) -> None:
        """A session that moved to another worker: no longer served here."""
        conn.detach()
        if self.sessions.pop(conn.sid, None) is not None:
            self._metrics.connections.dec()

    def peer(self, conn: Connection) -> _Peer:
        """What receives the WebSocket messages of ``conn``."""
        return _Peer(self, conn)

    def _open_payload(self, conn: Connection, upgrades: list[str]) -> str:
        return orjson.dumps(
            {
                "sid": conn.sid,
                "upgrades": upgrades,
                "pingInterval": self.options.ping_interval_ms,
                "pingTimeout": self.options.ping_timeout_ms,
                "maxPayload": self.options.max_payload,
            }
        ).decode()

    def awaiting_farewells(self) -> bool:
        """Whether a closed polling session's CLOSE still waits for its client's next poll
        (an expired farewell, which no client will fetch any more, is forgotten here)."""
        self._expire_farewells(time.monotonic())
        return bool(self.farewells)

    def _expire_farewells(self, now: float) -> None:
        order = self._farewell_order
        while order and order[0][0] <= now:  # amortised O(1) per close, even in a drain
            _, sid = order.popleft()
            self.farewells.pop(sid, None)

    def _closed(self, conn: Connection, reason: str) -> None:
        if conn.farewell is not None:
            now = time.monotonic()
            self._expire_farewells(now)
            keep = (self.options.ping_interval_ms + self.options.ping_timeout_ms) / 1000
            self.farewells[conn.sid] = (now + keep, conn.farewell)
            self._farewell_order.append((now + keep, conn.sid))
        if self.sessions.pop(conn.sid, None) is not None:
            self._metrics.connections.dec()
            self._metrics.disconnects.labels(_reason_label(reason)).inc()

    def close_all(self, reason: str) -> None:
        for conn in list(self.sessions.values()):
            conn.close(reason)

    # -- CORS -------------------------------------------------------------------------------------
    def _cors_headers(self, request: Request) -> list[tuple[str, str]] | None:
        origin = request.headers.get("origin")
        if origin is None:
            return []
        allowed = self.options.allowed_origins
        if allowed and "*" not in allowed and origin not in allowed:
            return None
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Origin"),
        ]


def _preflight(request: Request) -> list[tuple[str, str]]:
    headers = [("Access-Control-Allow-Methods", "GET, POST, OPTIONS")]
    asked = request.headers.get("access-control-request-headers")
    if asked:
        headers.append(("Access-Control-Allow-Headers", asked))
    return headers


def _reason_label(reason: str) -> str:
    return reason.split(":", 1)[0].replace(" ", "_")


class _Peer:
    """A WebSocket that carries a session from its start."""

    __slots__ = ("_conn", "_server")

    def __init__(self, server: EngineServer, conn: Connection) -> None:
        self._server = server
        self._conn = conn

    def on_ws_message(self, message: str | bytes) -> None:
        conn = self._conn
        moving = conn.moving
        if moving is not None:
            moving.append(message)
            return
        try:
            conn.receive(engineio.Packet.parse(message))
        except ProtocolError as error:
            self._server.protocol_error(conn, error)

    def on_ws_closed(self, reason: str) -> None:
        self._conn.close(reason, notify=False)


class _Ignored:
    def on_ws_message(self, message: str | bytes) -> None:
        return

    def on_ws_closed(self, reason: str) -> None:
        return


class _Probe:
    """A WebSocket offered as an upgrade of a polling session: ``2probe``, ``3probe``, ``5``."""

    __slots__ = ("_conn", "_peer", "_server", "ws")

    def __init__(self, server: EngineServer, conn: Connection) -> None:
        self._server = server
        self._conn = conn
        self._peer: _Peer | None = None
        """Set once upgraded: everything after ``5`` (even in the same read) goes to it."""
        self.ws: WebSocketConnection | None = None

    def on_ws_message(self, message: str | bytes) -> None:
        if self._peer is not None:
            self._peer.on_ws_message(message)
            return
        conn = self._conn
        if message == "2probe":
            conn.upgrading = True
            if self.ws is not None:
                self.ws.write(text_frame(b"3probe"))
            conn.release_poll("6")
        elif message == "5" and conn.upgrading and self.ws is not None:
            self._peer = _Peer(self._server, conn)
            conn.use_websocket(self.ws)
            upgraded = self._server.on_upgrade
            if upgraded is not None:
                upgraded(conn)
        else:
            self._server.protocol_error(
                conn,
                EngineIOError(f"unexpected packet {str(message)[:20]!r} during upgrade"),
            )

    def on_ws_closed(self, reason: str) -> None:
        if self._peer is not None:
            self._peer.on_ws_closed(reason)
        else:
            self._conn.upgrading = False  # the probe failed; polling goes on
