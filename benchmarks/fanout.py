"""One broadcast to a big room, through Roomcast's own Hub and Connection, over real sockets.

Opens N loopback TCP connections read by a child process pinned to CPU 1 (``send_floor.py``'s
``open_loopback``), and in the parent, pinned to CPU 0, wraps each accepted socket in a
uvloop transport and a WebSocket :class:`~roomcast.connection.Connection` joined to one room.
Each round is one ``Hub.broadcast`` of a ~200-byte event: the parent's CPU time for it, per
member, is the whole fan-out path (Python, uvloop and the kernel's ``send()``), without HTTP,
brokers or a load generator. Compare it with ``send_floor.py`` on the same machine.

    .venv/bin/python benchmarks/fanout.py 10000 --rounds 20
    .venv/bin/python benchmarks/fanout.py 10000 --parser msgpack     # socket.io-msgpack-parser
    .venv/bin/python benchmarks/fanout.py 10000 --binary 1024        # a 1 KiB attachment too
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import uvloop
from send_floor import open_loopback

from roomcast.connection import Connection, Flusher
from roomcast.hub import Hub
from roomcast.metrics import Metrics
from roomcast.protocol.parser import PARSERS
from roomcast.transport.http import Request, WebSocketConnection
from roomcast.types import SessionId

ROOM = ("/", "bench:room-0")
DATA = {"ts": 0.0, "seq": 0, "room": "bench:room-0", "pad": "x" * 130}


class _Member:
    """What the hub needs of a socket: its connection and its id."""

    __slots__ = ("conn", "id")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.id = conn.sid


async def _run(n: int, rounds: int, parser: str, binary: int) -> tuple[list[float], int]:
    loop = asyncio.get_running_loop()
    socks, reader = open_loopback(n)
    flusher = Flusher()
    hub = Hub(lambda key: None, lambda key: None, flusher, PARSERS[parser])
    extra = {"blob": os.urandom(binary)} if binary else {}
    members = []
    for i, sock in enumerate(socks):
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock)
        conn = Connection(
            SessionId(f"s{i}"),
            Request("GET", "/socket.io/", {}, {}),
            ping_interval=25,
            ping_timeout=20,
            limit=1 << 20,
            flusher=flusher,
            metrics=Metrics(),
            on_closed=lambda _conn, _reason: None,
        )
        conn.use_websocket(WebSocketConnection(transport, None, 1 << 20))  # type: ignore[arg-type]
        member = _Member(conn)
        members.append(member)
        hub.join(member, ROOM)  # type: ignore[arg-type]
    await asyncio.sleep(0.5)
    per_member = []
    for round_no in range(rounds):
        cpu = time.process_time()
        data = {**DATA, "seq": round_no, **extra}
        sent = hub.broadcast(ROOM, "bench", data, offset=f"{round_no + 1}-0")
        await asyncio.sleep(0)  # the flusher's pass, if anything was queued
        cpu = time.process_time() - cpu
        assert sent == n, sent
        per_member.append(1e6 * cpu / n)
        await asyncio.sleep(0.3)
    for member in members:
        member.conn.close("bench over", notify=False)
    await asyncio.sleep(0.2)
    return per_member, reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", type=int, nargs="?", default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--parser", choices=sorted(PARSERS), default="json")
    parser.add_argument("--binary", type=int, default=0, help="bytes of an attachment to add")
    args = parser.parse_args()
    per_member, reader = uvloop.run(_run(args.members, args.rounds, args.parser, args.binary))
    os.waitpid(reader, 0)  # it exits once every connection is closed
    print(
        f"{args.members} members, {args.rounds} broadcasts, parser {args.parser}, "
        f"attachment {args.binary} bytes: CPU per member "
        f"median {statistics.median(per_member):.2f} us, "
        f"min {min(per_member):.2f}, max {max(per_member):.2f}"
    )


if __name__ == "__main__":
    main()
