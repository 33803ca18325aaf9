"""The listening socket: accepts every pending connection each time it is readable.

``loop.create_server`` on uvloop accepts one connection per event-loop iteration (libuv
accepts once per readiness event since 1.45). While the loop works through a reconnection
storm, an iteration lasts tens of milliseconds, so the server accepts a few dozen connections
a second while thousands wait in the kernel's accept queue, and a health check waits behind
all of them: ``/readyz`` answered in 1-2 s while the loop itself never stalled for more than
0.1 s (``benchmarks/storm.py``). Here the socket is watched with ``add_reader`` and each
readiness accepts up to :data:`BATCH` connections, so the queue is emptied every iteration
and a probe's connection waits one iteration, not the whole queue.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from roomcast.tasks import TaskSet

log = logging.getLogger("roomcast.http")

BATCH = 512
"""Connections accepted per readiness at most (the rest on the next iteration)."""
RETRY_S = 1.0
"""Pause of the accepting after the process ran out of file descriptors."""

ProtocolFactory = Callable[[], asyncio.Protocol]


class Listener:
    """Accepts on ``sock`` (bound and listening) and serves each connection with a protocol
    from ``factory``; ``refused(reason)`` counts a connection that could not be accepted."""

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        tasks: TaskSet,
        refused: Callable[[str], None],
    ) -> None:
        self.socket = sock
        self._factory = factory
        self._tasks = tasks
        self._refused = refused
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        accepted: list[socket.socket] = []
        for _ in range(BATCH):
            try:
                conn, _address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:  # the client gave up while queued
                continue
            except OSError as exc:
                self._refused("accept_failed")
                log.error("accepting a connection failed: %s", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the queue stays readable, so pause rather
                    # than spin, and let closing connections free some meanwhile.
                    self._loop.remove_reader(self.socket.fileno())
                    self._retry = self._loop.call_later(RETRY_S, self._resume)
                break
            conn.setblocking(False)
            accepted.append(conn)
        if accepted:
            self._tasks.spawn(self._serve(accepted), name="accept")

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self.socket.fileno(), self._accept)

    async def _serve(self, accepted: list[socket.socket]) -> None:
        loop = self._loop
        results = await asyncio.gather(
            *(loop.connect_accepted_socket(self._factory, conn) for conn in accepted),
            return_exceptions=True,
        )
        for conn, result in zip(accepted, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                self._refused("accept_failed")
                log.error("serving an accepted connection failed: %r", result)
                conn.close()

    def close(self) -> None:
        """Accept no more connections; those accepted go on."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self.socket.fileno())
        self.socket.close()


def bind(host: str, port: int, *, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (all interfaces when empty), as
    ``loop.create_server`` makes them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {exc}"
                ) from None
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
