"""The floor of a broadcast on this machine: one bare ``send()`` of a pre-built frame per socket.

Opens N loopback TCP connections, reads them in a child process pinned to CPU 1 (epoll), and from
the parent, pinned to CPU 0, sends one 230-byte frame to every socket per round. It prints the
parent's CPU time per ``send()``: no server does less work per delivered message on this kernel.

    .venv/bin/python benchmarks/send_floor.py 5000
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

FRAME = b"x" * 230
ROUNDS = 5


def _reader(port: int, n: int, ready: int) -> None:
    os.sched_setaffinity(0, {1})
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    poller = select.epoll()
    for conn in conns:
        conn.setblocking(False)
        poller.register(conn.fileno(), select.EPOLLIN)
    os.write(ready, b"x")
    while True:
        for fd, _ in poller.poll(-1, 1024):
            if not os.read(fd, 65536):  # the sender closed its sockets: done
                os._exit(0)


def open_loopback(n: int) -> tuple[list[socket.socket], int]:
    """``n`` accepted loopback TCP sockets (``TCP_NODELAY``, non-blocking) whose other ends a
    child process pinned to CPU 1 reads; this process is pinned to CPU 0.

    Returns the sockets and the reader's pid: it exits once the sockets are closed."""
    if not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("needs CPUs 0 and 1: the sender and the reader each get one")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        _reader(port, n, ready_w)
    os.sched_setaffinity(0, {0})
    socks = [listener.accept()[0] for _ in range(n)]
    listener.close()
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    os.read(ready_r, 1)
    return socks, child


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    socks, reader = open_loopback(n)
    for round_no in range(ROUNDS):
        cpu, wall = time.process_time(), time.perf_counter()
        for sock in socks:
            sock.send(FRAME)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"round {round_no}: {1e6 * cpu / n:.2f} us of CPU per send, {1e3 * wall:.1f} ms")
        time.sleep(0.5)
    for sock in socks:
        sock.close()
    os.waitpid(reader, 0)


if __name__ == "__main__":
    main()
