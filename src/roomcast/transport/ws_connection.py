"""The asyncio side of one WebSocket: bytes in to the frame reader, frames out, close, abort,
and the hold / detach that moving a session to another worker needs."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Protocol

from roomcast.transport.websocket import WebSocketClosedError, WebSocketReader

log = logging.getLogger("roomcast.http")


class WebSocketPeer(Protocol):
    def on_ws_message(self, message: str | bytes) -> None: ...

    def on_ws_closed(self, reason: str) -> None: ...


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
