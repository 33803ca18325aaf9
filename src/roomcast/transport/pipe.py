"""A client connection piped, byte for byte, to the worker that owns its session."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("roomcast.http")


_PIPE_CLOSE_GRACE = 10.0
"""Seconds a piped client gets to take its last bytes after the worker closed."""


class Pipe(asyncio.Protocol):
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
