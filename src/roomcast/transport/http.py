"""The asyncio HTTP/1.1 server: one protocol object per TCP connection.

HTTP parsing is done by ``httptools`` (the parser uvicorn uses).  Requests are handed, one at a
time and in order, to an :class:`HttpHandler`, which answers through the :class:`Exchange` now or
later (a long-poll).  An exchange may instead switch the connection to WebSocket; from then on
received bytes go to a :class:`WebSocketPeer`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qsl

import httptools

from roomcast.transport.websocket import WebSocketClosedError, WebSocketReader, accept_key

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


class WebSocketPeer(Protocol):
    def on_ws_message(self, message: str | bytes) -> None: ...

    def on_ws_closed(self, reason: str) -> None: ...


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


_LINGER_ZERO = struct.pack("ii", 1, 0)


class WebSocketConnection:
    """What the engine layer holds for a WebSocket: raw writes and close."""

    __slots__ = ("_closed", "_held", "_last", "peer", "reader", "transport")

    def __init__(self, transport: asyncio.Transport, peer: WebSocketPeer, max_size: int) -> None:
        self.transport = transport
        self.peer = peer
        self.reader = WebSocketReader(max_size)
        self._closed = False
        self._held = False
        """Reading is paused while the session may move to another worker (``handoff``)."""
        self._last: bytes | None = None
        """While held: the read in which reading stopped."""

    @property
    def direct(self) -> bool:
        """The client's own TCP connection, not one piped from another worker."""
        return isinstance(self.transport.get_extra_info("peername"), tuple)

    def hold(self) -> None:
        """Stop reading; messages already read are still delivered to the peer."""
        self._held = True
        self.transport.pause_reading()

    def release(self) -> None:
        """Read again (the session stays here)."""
        self._held = False
        self._last = None
        if not self._closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def unread(self) -> bytes | None:
        """While held: the bytes read that are not part of a message yet (the start of the
        next frame), or ``None`` if they are not all known (they began in an earlier read, or
        a fragmented message is half received)."""
        reader = self.reader
        if reader.fragmented:
            return None
        last, partial = self._last, reader.partial
        if partial == 0:
            return b""
        if last is None or partial > len(last):
            return None
        return last[len(last) - partial :]

    def detach(self) -> None:
        """Let go of the connection without ending it: another process holds it now.  Only
        this process's descriptor is closed; no close frame, no FIN (nothing was shut down)."""
        self._closed = True
        self.transport.abort()

    def write(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        self.transport.write(self.reader.close_frame(code, reason))
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection and everything queued for it, now: with linger 0 the kernel
        discards its send buffer too and the peer gets a reset, so a client that stopped
        reading does not keep a socket and its buffer alive."""
        self._closed = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError as exc:  # already gone: the abort below is all that is left to do
                log.debug("could not set linger 0 before an abort: %s", exc)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            reply = self.reader.receive(data, self.peer.on_ws_message)
        except WebSocketClosedError as closed:
            self._closed = True
            self.transport.write(closed.reply)
            self.transport.close()
            self.peer.on_ws_closed(closed.reason)
            return
        if self._held:
            self._last = data
        if reply:
            self.transport.write(reply)

    def connection_lost(self) -> None:
        if not self._closed:
            self._closed = True
            self.peer.on_ws_closed("transport closed")


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_adopt",
        "_body",
        "_body_limit",
        "_current",
        "_handler",
        "_headers",
        "_parser",
        "_pending",
        "_pipe",
        "_transport",
        "_url",
        "_ws",
    )

    def __init__(self, handler: HttpHandler, body_limit: int) -> None:
        self._handler = handler
        self._body_limit = body_limit
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._pending: list[Request] = []
        self._current: Exchange | None = None
        self._ws: WebSocketConnection | None = None
        self._pipe: _Pipe | None = None
        self._adopt: tuple[WebSocketPeer, int, Callable[[WebSocketConnection], None]] | None = None

    @classmethod
    def adopted(
        cls, peer: WebSocketPeer, max_size: int, ready: Callable[[WebSocketConnection], None]
    ) -> HttpConnection:
        """A WebSocket that another worker accepted and handed over: no HTTP is read on it.
        ``ready`` gets the WebSocket before the first byte is read."""
        conn = cls(_NoHttp(), 0)
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

    def data_received(self, data: bytes) -> None:
        if self._pipe is not None:
            self._pipe.to_upstream(data)
            return
        if self._ws is not None:
            self._ws.data_received(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._upgrade(data[offset:])
        except httptools.HttpParserError as exc:
            log.info("malformed http request: %s %r", exc, data[:300])
            self._fail(400, "malformed request")

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading from the worker piped to it, so
        the owning worker's buffer limit, not this process's memory, takes the backlog."""
        if self._pipe is not None:
            self._pipe.pause_upstream()

    def resume_writing(self) -> None:
        if self._pipe is not None:
            self._pipe.resume_upstream()

    def connection_lost(self, exc: Exception | None) -> None:
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
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        if sum(len(b) for b in self._body) > self._body_limit:
            self._body = []
            self._fail(413, "request body too large")

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

    # -- internals --------------------------------------------------------------------------
    def _next(self) -> None:
        while self._current is None and self._pending and self._transport is not None:
            request = self._pending.pop(0)
            exchange = Exchange(self, request.keep_alive)
            self._current = exchange
            self._handler.handle(request, exchange)

    def _upgrade(self, rest: bytes) -> None:
        if not self._pending or self._current is not None:
            self._fail(400, "upgrade while a request is in progress")
            return
        request = self._pending.pop()
        exchange = Exchange(self, False)
        self._current = exchange
        self._handler.handle(request, exchange)
        if self._ws is not None and rest:
            self._ws.data_received(rest)

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
        self._current = None
        self._ws = WebSocketConnection(self._transport, peer, max_size)
        self._headers = {}
        return self._ws

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
        pipe = _Pipe(transport)
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

    def _fail(self, status: int, message: str) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        body = message.encode()
        self._transport.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            + body
        )
        self._transport.close()


class _NoHttp:
    """The handler of an adopted WebSocket, which never reads HTTP."""

    def handle(self, request: Request, exchange: Exchange) -> None:
        raise RuntimeError("an adopted websocket does not read http requests")


_PIPE_CLOSE_GRACE = 10.0
"""Seconds a piped client gets to take its last bytes after the worker closed."""


class _Pipe(asyncio.Protocol):
    """Bytes between a client connection and another worker, both ways, until either closes."""

    def __init__(self, client: asyncio.Transport) -> None:
        self._client = client
        self._upstream: asyncio.Transport | None = None
        self._upstream_paused = False
        self._early: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        """Held here: the pipe lives as long as the client connection references it."""

    async def open(self, unix_path: str, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: self, unix_path)
        except OSError as exc:
            log.warning("cannot forward to worker at %s: %s", unix_path, exc)
            self._client.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self._client.close()
            return
        assert self._upstream is not None
        self._upstream.write(head + b"".join(self._early))
        self._early = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upstream: asyncio.Transport = transport  # type: ignore[assignment]
        self._upstream = upstream
        if self._upstream_paused:
            upstream.pause_reading()

    def data_received(self, data: bytes) -> None:
        self._client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """The worker closed its side. The client gets what is still buffered for it, within
        ``_PIPE_CLOSE_GRACE`` seconds: a client that stopped reading is aborted then."""
        if exc is not None:
            self._client.abort()
            return
        self._client.close()
        if self._client.get_write_buffer_size():
            asyncio.get_running_loop().call_later(_PIPE_CLOSE_GRACE, self._client.abort)

    # Flow control, both ways: a slow reader on one side stops reading on the other.
    def pause_writing(self) -> None:
        self._client.pause_reading()

    def resume_writing(self) -> None:
        self._client.resume_reading()

    def pause_upstream(self) -> None:
        self._upstream_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_upstream(self) -> None:
        self._upstream_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    def to_upstream(self, data: bytes) -> None:
        if self._upstream is None:
            self._early.append(data)
        else:
            self._upstream.write(data)

    def client_lost(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
