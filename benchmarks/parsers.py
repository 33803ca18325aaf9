"""What each parser costs per message: encoding one broadcast (done once per broadcast, then the
same bytes go to every member) and decoding one client event (done per received packet).

The broadcast figure is ``Hub.broadcast`` to a room whose one member is a WebSocket connection
writing into a transport that drops the bytes, so it is the encode path plus one member's send;
subtract ``--members 1``'s send (the ``empty`` row, a broadcast of ``None``) to compare parsers.
The fan-out per member does not depend on the parser: every member gets the same pre-built
bytes (``benchmarks/fanout.py --parser ...`` measures that over real sockets).

    .venv/bin/python benchmarks/parsers.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from roomcast.connection import Connection, Flusher
from roomcast.hub import Hub
from roomcast.metrics import Metrics
from roomcast.protocol.parser import PARSERS
from roomcast.protocol.socketio import Limits, Packet, PacketType
from roomcast.transport.http import Request
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId

ROOM = ("/", "bench:room-0")
JSON_DATA = {"ts": 1700000000.123, "seq": 42, "room": "bench:room-0", "pad": "x" * 130}
CASES: dict[str, Any] = {
    "~200-byte JSON": JSON_DATA,
    "JSON + 1 KiB bytes": {**JSON_DATA, "blob": os.urandom(1024)},
    "JSON + 64 KiB bytes": {**JSON_DATA, "blob": os.urandom(65536)},
}


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> object:
        return None


class _Member:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.id = conn.sid


def _best_us(run: Any, count: int, repeat: int) -> float:
    """The fastest of ``repeat`` timings of ``count`` calls, in CPU microseconds per call (CPU
    time: the machine may be shared)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(count):
            run()
        best = min(best, time.process_time() - start)
    return 1e6 * best / count


async def _broadcast_us(parser: str, data: Any, count: int, repeat: int) -> float:
    flusher = Flusher()
    hub = Hub(lambda key: None, lambda key: None, flusher, PARSERS[parser])
    conn = Connection(
        SessionId("s"),
        Request("GET", "/socket.io/", {}, {}),
        ping_interval=25,
        ping_timeout=20,
        limit=1 << 30,
        flusher=flusher,
        metrics=Metrics(),
        on_closed=lambda _conn, _reason: None,
    )
    conn.use_websocket(WebSocketConnection(_NullTransport(), None, 1 << 20))  # type: ignore[arg-type]
    hub.join(_Member(conn), ROOM)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    offset = iter(range(1, 1 << 40))

    def run() -> None:
        with flusher.batch():  # queue, never write: the member's send is not what is measured
            hub.broadcast(ROOM, "bench", data, offset=f"{next(offset)}-0")
        conn._out = None  # drop what was queued
        flusher._dirty.clear()
        conn._out_size = 0

    return _best_us(run, count, repeat)


def _decode_us(parser: str, data: Any, count: int, repeat: int) -> float:
    codec = PARSERS[parser]
    messages = codec.encode(Packet(PacketType.EVENT, "/", ["bench", data], 7))
    decoder = codec.decoder(Limits(max_attachments=10, max_nesting=32))

    def run() -> None:
        for message in messages:
            decoder.feed(message)

    return _best_us(run, count, repeat)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--count", type=int, default=20_000)
    cli.add_argument("--repeat", type=int, default=5)
    args = cli.parse_args()
    print("| data | parser | encode a broadcast (us) | decode a client event (us) |")
    print("|---|---|---:|---:|")
    for label, data in CASES.items():
        count = args.count if "64 KiB" not in label else args.count // 20
        for parser in sorted(PARSERS):
            broadcast = asyncio.run(_broadcast_us(parser, data, count, args.repeat))
            decode = _decode_us(parser, data, count, args.repeat)
            print(f"| {label} | {parser} | {broadcast:.2f} | {decode:.2f} |")


if __name__ == "__main__":
    main()
