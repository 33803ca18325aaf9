"""The asyncio HTTP/1.1 server: one protocol object per TCP connection.

HTTP parsing is done by ``httptools`` (the parser uvicorn uses).  Requests are handed, one at a
time and in order, to an :class:`HttpHandler`, which answers through the :class:`Exchange` now or
later (a long-poll).  An exchange may instead switch the connection to WebSocket; from then on
received bytes go to a :class:`WebSocketPeer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qsl

import httptools
import orjson

from roomcast.transport.limits import ClientAddresses, HttpLimits, forwarded_client
from roomcast.transport.pipe import Pipe
from roomcast.transport.websocket import accept_key
from roomcast.transport.ws_connection import WebSocketConnection, WebSocketPeer

log = logging.getLogger("roomcast.http")

_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Header names are lower-case; repeated headers are joined with ``, ``."""
    body: bytes = b""
    upgrade: bool = False
    client: str = ""
    keep_alive: bool = True
    target: str = ""
    """The raw request target (path and query), for forwarding."""


class HttpHandler(Protocol):
    def handle(self, request: Request, exchange: Exchange) -> None: ...


class Exchange:
    """One request's answer.  Exactly one of ``respond`` or ``accept_websocket`` is called."""

    __slots__ = ("_aborted", "_conn", "_keep_alive", "done", "on_abort")

    def __init__(self, conn: HttpConnection, keep_alive: bool) -> None:
        self._conn = conn
        self._keep_alive = keep_alive
        self.done = False
        self._aborted = False
        self.on_abort: list[Callable[[], None]] = []

    @property
    def aborted(self) -> bool:
        return self._aborted

    def respond(
        self,
        status: int,
        body: bytes | str = b"",
        headers: list[tuple[str, str]] | None = None,
        content_type: str = "text/plain; charset=UTF-8",
    ) -> None:
        if self.done:
            raise RuntimeError("response already sent")
        self.done = True
        if self._aborted:
            return
        data = body.encode("utf-8") if isinstance(body, str) else body
        self._conn.send_response(status, data, headers or [], content_type, self._keep_alive)

    def accept_websocket(
        self, peer: WebSocketPeer, key: str, max_size: int, headers: list[tuple[str, str]]
    ) -> WebSocketConnection:
        self.done = True
        return self._conn.switch_to_websocket(peer, key, max_size, headers)

    def forward(self, request: Request, unix_path: str) -> None:
        """Hand the rest of this connection to the worker listening on ``unix_path``."""
        self.done = True
        self._conn.forward(request, unix_path)

    def abort(self) -> None:
        """The client went away before the answer; run the registered callbacks once."""
        if self._aborted or self.done:
            return
        self._aborted = True
        callbacks, self.on_abort = self.on_abort, []
        for callback in callbacks:
            callback()


class HttpConnection(asyncio.Protocol):
    """One client TCP connection: HTTP/1.1 requests, until it becomes a WebSocket or a pipe.

    Until a request is handled, the connection is held to :class:`HttpLimits`: a head must
    come complete and soon, a body may not exceed its limit, and one client address may hold
    only so many connections.  Every refusal is answered (or the connection closed) and told
    to the ``ClientAddresses``' refusal handler."""

    __slots__ = (
        "_address",
        "_addresses",
        "_adopt",
        "_body",
        "_body_size",
        "_current",
        "_early",
        "_handler",
        "_head_size",
        "_header_count",
        "_headers",
        "_in_head",
        "_limits",
        "_parser",
        "_paused",
        "_pending",
        "_pipe",
        "_refused",
        "_timer",
        "_transport",
        "_url",
        "_ws",
    )

    def __init__(self, handler: HttpHandler, addresses: ClientAddresses | None = None) -> None:
        self._handler = handler
        self._addresses = addresses
        self._limits = addresses.limits if addresses is not None else HttpLimits()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._header_count = 0
        self._in_head = 0
        """Bytes received since the current request head began (0 outside a head); httptools
        buffers a header until it is complete, so an endless one is cut off by this count."""
        self._pending: list[Request] = []
        self._current: Exchange | None = None
        self._ws: WebSocketConnection | None = None
        self._pipe: Pipe | None = None
        self._adopt: tuple[WebSocketPeer, int, Callable[[WebSocketConnection], None]] | None = None
        self._address: str | None = None
        """The client address counted against the per-address cap (until the connection ends)."""
        self._timer: asyncio.TimerHandle | None = None
        """The head or idle timeout, while one runs."""
        self._paused = False
        """Reading stopped: a complete request waits behind the one in progress."""
        self._refused = False
        self._early: bytes | None = None
        """Bytes read after an upgrade request whose answer waits (for its turn to open a
        session): reading stops meanwhile, and the WebSocket gets them first."""

    @classmethod
    def adopted(
        cls, peer: WebSocketPeer, max_size: int, ready: Callable[[WebSocketConnection], None]
    ) -> HttpConnection:
        """A WebSocket that another worker accepted and handed over: no HTTP is read on it.
        ``ready`` gets the WebSocket before the first byte is read."""
        conn = cls(_NoHttp())
        conn._adopt = (peer, max_size, ready)
        return conn

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        if self._adopt is not None:
            peer, max_size, ready = self._adopt
            self._adopt = None
            self._ws = WebSocketConnection(self._transport, peer, max_size)  # type: ignore[arg-type]
            ready(self._ws)
            return
        addresses = self._addresses
        if addresses is not None:
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) else None
            # A trusted proxy's connections are counted by the client its first request names.
            if host is not None and not addresses.trusted(host) and not self._hold_address(host):
                return
        self._arm(self._limits.head_timeout_s, "head_timeout")

    def _hold_address(self, address: str) -> bool:
        """Count this connection against ``address``'s cap; refuse it (429) when over."""
        assert self._addresses is not None
        if not self._addresses.acquire(address):
            self._refuse(429, "too_many_connections", "too many connections from one address")
            return False
        self._address = address
        return True

    def data_received(self, data: bytes) -> None:
        if self._pipe is not None:
            self._pipe.to_upstream(data)
            return
        if self._ws is not None:
            self._ws.data_received(data)
            return
        if self._refused:
            return
        if self._in_head:
            self._in_head += len(data)
            if self._in_head > self._limits.head_bytes + _READ_SLACK:
                self._refuse(431, "headers_too_large", "request headers too large")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._upgrade(data[offset:])
        except httptools.HttpParserCallbackError:
            if self._refused:  # a callback refused the request and stopped the parser
                return
            log.exception("http request handling failed")
            self._refuse(500, "internal_error", "internal error")
        except httptools.HttpParserError as exc:
            log.info("malformed http request from %s: %s", self._peer_host(), exc)
            self._refuse(400, "malformed_request", "malformed request")

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading from the worker piped to it, so
        the owning worker's buffer limit, not this process's memory, takes the backlog."""
        if self._pipe is not None:
            self._pipe.pause_upstream()

    def resume_writing(self) -> None:
        if self._pipe is not None:
            self._pipe.resume_upstream()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        addresses = self._addresses
        if addresses is not None:
            if self._address is not None:
                addresses.release(self._address)
                self._address = None
            if self._transport is not None:
                addresses.lingering.discard(self._transport)
        if self._pipe is not None:
            self._pipe.client_lost()
        if self._ws is not None:
            self._ws.connection_lost()
        if self._current is not None:
            self._current.abort()
            self._current = None
        self._pending.clear()
        self._transport = None

    # -- httptools callbacks ----------------------------------------------------------------
    # A callback that refuses the request raises _Refused: httptools then stops parsing what
    # is left of the read (it re-raises it wrapped in HttpParserCallbackError).
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._head_size = 0
        self._header_count = 0
        self._in_head = 1
        self._arm(self._limits.head_timeout_s, "head_timeout")

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self._limits.head_bytes:
            self._refuse(414, "url_too_long", "request url too long")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._header_count += 1
        if self._head_size > self._limits.head_bytes or self._header_count > self._limits.headers:
            self._refuse(431, "headers_too_large", "request headers too large")
            raise _Refused
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self._in_head = 0
        self._disarm()  # the head came in time; the handler answers (or holds a long-poll)
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.body_bytes:
            self._refuse(413, "body_too_large", "request body too large")
            raise _Refused
        if self._addresses is not None and self._address is None:
            self._address_from_proxy()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.body_bytes:
            self._body = []
            self._refuse(413, "body_too_large", "request body too large")
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        parsed = httptools.parse_url(self._url)
        path = parsed.path.decode("latin-1")
        query = dict(parse_qsl(parsed.query.decode("latin-1"))) if parsed.query else {}
        peer = self._transport.get_extra_info("peername")
        request = Request(
            method=self._parser.get_method().decode("ascii"),
            path=path,
            query=query,
            headers=self._headers,
            body=b"".join(self._body),
            upgrade=self._parser.should_upgrade(),
            client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
            target=self._url.decode("latin-1"),
            keep_alive=self._parser.should_keep_alive()
            and "close" not in self._headers.get("connection", "").lower(),
        )
        self._pending.append(request)
        if self._current is None and not request.upgrade:
            self._next()
        elif self._current is not None and not self._paused:
            # Pipelined behind a request in progress (a held long-poll): read no more until
            # it is answered, so the client cannot queue requests without bound.
            self._paused = True
            self._transport.pause_reading()

    # -- internals --------------------------------------------------------------------------
    def _next(self) -> None:
        while self._current is None and self._pending and self._transport is not None:
            request = self._pending.pop(0)
            exchange = Exchange(self, request.keep_alive)
            self._current = exchange
            self._handler.handle(request, exchange)
        transport = self._transport
        if transport is None or transport.is_closing() or self._current is not None:
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._ws is None and self._pipe is None:
            self._arm(self._limits.idle_timeout_s, "idle_timeout")

    def _address_from_proxy(self) -> None:
        """A trusted proxy's connection: count it against the client its request names."""
        assert self._addresses is not None
        header = self._headers.get("x-forwarded-for")
        client = (
            forwarded_client(header, self._addresses.limits.trusted_proxies) if header else None
        )
        if client is not None and not self._hold_address(client):
            raise _Refused

    def _peer_host(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return str(peer[0]) if isinstance(peer, tuple) else "?"

    def _arm(self, delay: float, reason: str) -> None:
        self._disarm()
        if delay > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self._timed_out, reason)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, reason: str) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or self._current is not None:
            return
        if self._ws is not None or self._pipe is not None:
            return
        started = bool(self._url or self._headers) and reason == "head_timeout"
        if started:
            self._refuse(408, reason, "request head not received in time")
        else:  # nothing was asked: nothing to answer
            self._refused = True
            self._count(reason)
            transport.close()

    def _upgrade(self, rest: bytes) -> None:
        if not self._pending or self._current is not None:
            self._refuse(400, "malformed_request", "upgrade while a request is in progress")
            return
        request = self._pending.pop()
        exchange = Exchange(self, False)
        self._current = exchange
        self._handler.handle(request, exchange)
        if self._ws is not None:
            if rest:
                self._ws.data_received(rest)
        elif not exchange.done and self._transport is not None:
            self._early = rest
            self._transport.pause_reading()

    def switch_to_websocket(
        self, peer: WebSocketPeer, key: str, max_size: int, headers: list[tuple[str, str]]
    ) -> WebSocketConnection:
        assert self._transport is not None
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(key)}",
        ]
        lines.extend(f"{k}: {v}" for k, v in headers)
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self._disarm()
        self._current = None
        self._ws = WebSocketConnection(self._transport, peer, max_size)
        self._headers = {}
        early, self._early = self._early, None
        if early is not None:  # answered later than read: go on reading, early bytes first
            self._transport.resume_reading()
            if early:
                asyncio.get_running_loop().call_soon(self._feed_early, self._ws, early)
        return self._ws

    @staticmethod
    def _feed_early(ws: WebSocketConnection, data: bytes) -> None:
        ws.data_received(data)

    def forward(self, request: Request, unix_path: str) -> None:
        """Pipe this connection, starting with ``request``, to another worker's unix socket.

        The request is re-sent with ``Connection: close``, so the connection carries exactly one
        request (or one WebSocket) and then ends.
        """
        transport = self._transport
        if transport is None:
            return
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        for name, value in request.headers.items():
            if name not in ("connection", "content-length", "transfer-encoding") or (
                request.upgrade and name == "connection"
            ):
                lines.append(f"{name}: {value}")
        if not request.upgrade:
            lines.append("connection: close")
            lines.append(f"content-length: {len(request.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body
        pipe = Pipe(transport)
        self._disarm()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._ws = None
        self._pipe = pipe
        self._current = None
        pipe.task = asyncio.get_running_loop().create_task(
            pipe.open(unix_path, head), name="forward"
        )

    def send_response(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]],
        content_type: str,
        keep_alive: bool,
    ) -> None:
        transport = self._transport
        if transport is None:
            return
        keep_alive = keep_alive and status < 500
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        if body or status not in (101, 204, 304):
            head.append(f"Content-Type: {content_type}")
            head.append(f"Content-Length: {len(body)}")
        head.extend(f"{k}: {v}" for k, v in headers)
        if not keep_alive:
            head.append("Connection: close")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self._current = None
        if not keep_alive:
            transport.close()
            return
        if self._pending:
            asyncio.get_running_loop().call_soon(self._next)
        else:
            self._arm(self._limits.idle_timeout_s, "idle_timeout")

    def _count(self, reason: str) -> None:
        if self._addresses is not None:
            self._addresses.refused(reason)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with a JSON error, counted by ``code``, and close: what is left of
        the request is not read."""
        self._refused = True
        self._disarm()
        self._count(code)
        if self._current is not None:  # a request in progress (a held poll) gets no answer now
            self._current.abort()
            self._current = None
        self._pending.clear()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        body = orjson.dumps({"error": {"code": code, "message": message}})
        transport.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            + body
        )
        if not transport.can_write_eof():
            transport.close()
            return
        # A lingering close: end our side, then discard what the client is still sending for
        # a moment.  Closing at once, with its bytes unread, would reset the connection, and
        # the reset can destroy the answer before the client reads it.
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._addresses is not None:
            self._addresses.lingering.add(transport)
        asyncio.get_running_loop().call_later(_LINGER_S, self._linger_over, transport)

    def _linger_over(self, transport: asyncio.Transport) -> None:
        if self._addresses is not None:
            self._addresses.lingering.discard(transport)
        transport.close()


_READ_SLACK = 64 * 1024
"""One read may hold a head's end and a body's start: allowed over the head limit."""
_LINGER_S = 2.0
"""How long a refused connection's input is read and discarded before it is closed."""


class _Refused(Exception):
    """Raised from a parser callback after the request was refused."""


class _NoHttp:
    """The handler of an adopted WebSocket, which never reads HTTP."""

    def handle(self, request: Request, exchange: Exchange) -> None:
        raise RuntimeError("an adopted websocket does not read http requests")
