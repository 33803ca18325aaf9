"""CPU per publication through a node's whole publish path, over real sockets, with tracing off or on.

Builds one in-process :class:`~roomcast.node.Node` (memory broker, or ``--redis-url``) whose
rooms hold members with real WebSocket connections (loopback TCP read by a child process pinned
to CPU 1, as in ``fanout.py``), then publishes ``--publications`` events round-robin over the
rooms with ``Node.publish`` (the path of the HTTP API, after parsing) and waits until every
member got every event. The figure is this process's CPU time per publication: the publish,
the broker, the delivery handler (``SocketServer.deliver``, or tracing's around it), the hub's
encoding and the ``send()`` calls. Rounds alternate with ``--compare``, so the two settings
see the same machine.

    .venv/bin/python benchmarks/publish_path.py --rooms 200 --members 10 --publications 20000
    .venv/bin/python benchmarks/publish_path.py --tracing off,on --rounds 3

``--tracing on`` exports every span with OTLP/HTTP to a sink in a child process (pinned to CPU
1), so the figure includes the SDK's batch processor and exporter thread; ``on-noexport`` makes
the spans and exports none (``OTEL_TRACES_EXPORTER=none``). Each mode runs in a fresh process.
Run the same script against other code with ``PYTHONPATH=/path/to/src`` (``off`` only, for
code without tracing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import uvloop
from send_floor import open_loopback

from roomcast.broker.base import PublishRequest
from roomcast.config import load
from roomcast.connection import Connection
from roomcast.metrics import Metrics
from roomcast.node import Node
from roomcast.transport.http import Request, WebSocketConnection
from roomcast.types import SessionId

DATA = {"ts": 0.0, "seq": 0, "room": "bench:room-0", "pad": "x" * 130}


class _Member:
    """What the hub needs of a socket: its connection and its id."""

    __slots__ = ("conn", "id")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.id = conn.sid


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _sink() -> tuple[subprocess.Popen[bytes], int]:
    """An OTLP/HTTP sink (answers 200 to everything) in a child process on CPU 1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    code = (
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from publish_path import _Sink\n"
        "from http.server import HTTPServer\n"
        "os.sched_setaffinity(0, {1})\n"
        "HTTPServer(('127.0.0.1', int(sys.argv[1])), _Sink).serve_forever()\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen([sys.executable, "-c", code, str(port), here])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return child, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def _run(args: argparse.Namespace, mode: str) -> tuple[int, dict[str, Any]]:
    loop = asyncio.get_running_loop()
    flags: dict[str, Any] = {"redis_url": args.redis_url} if args.redis_url else {}
    if args.redis_url:
        flags["redis_prefix"] = f"pubpath{os.getpid()}"
    if mode != "off":
        flags["tracing"] = "on"
    node = Node(load(flags, environ={}))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    await node.start(listener)
    n = args.rooms * args.members
    socks, reader = open_loopback(n)
    rooms = [f"bench:room-{r}" for r in range(args.rooms)]
    members = []
    for i, sock in enumerate(socks):
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock)
        conn = Connection(
            SessionId(f"s{i}"),
            Request("GET", "/socket.io/", {}, {}),
            ping_interval=25,
            ping_timeout=20,
            limit=1 << 24,
            flusher=node.flusher,
            metrics=Metrics(),
            on_closed=lambda _conn, _reason: None,
        )
        conn.use_websocket(WebSocketConnection(transport, None, 1 << 24))  # type: ignore[arg-type]
        member = _Member(conn)
        members.append(member)
        node.hub.join(member, ("/", rooms[i % args.rooms]))  # type: ignore[arg-type]
    for room in rooms:
        await node.subscriptions.wait(room)
    await asyncio.sleep(0.5)
    registry = node.metrics.registry

    def delivered() -> float:
        return registry.get_sample_value("roomcast_delivered_messages_total") or 0.0

    expected = args.publications * args.members
    start_delivered = delivered()
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    window = 64  # publications in flight, as from many HTTP requests at once
    pending: set[asyncio.Task[Any]] = set()
    for seq in range(args.publications):
        request = PublishRequest(
            room=rooms[seq % args.rooms], event="bench", data={**DATA, "seq": seq}
        )
        pending.add(asyncio.ensure_future(node.publish(request)))
        if len(pending) >= window:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if pending:
        await asyncio.wait(pending)
    while delivered() - start_delivered < expected:  # noqa: ASYNC110 - a counter, no event
        await asyncio.sleep(0.001)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for member in members:
        member.conn.close("bench over", notify=False)
    await node.stop()
    await asyncio.sleep(0.2)
    return reader, {
        "mode": mode,
        "cpu_us_per_publication": 1e6 * cpu / args.publications,
        "publications_per_s": args.publications / wall,
    }


def _child(args: argparse.Namespace, mode: str) -> None:
    sink = None
    if mode == "on":
        sink, port = _sink()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    elif mode == "on-noexport":
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
    try:
        reader, result = uvloop.run(_run(args, mode))
        os.waitpid(reader, 0)  # it exits once every connection is closed
    finally:
        if mode != "off":
            from roomcast.tracing import shutdown

            shutdown()
        if sink is not None:
            sink.kill()
            sink.wait()
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--members", type=int, default=10, help="members per room")
    parser.add_argument("--publications", type=int, default=20_000)
    parser.add_argument("--redis-url", default="")
    parser.add_argument(
        "--tracing", default="off", help="comma-separated modes: off, on, on-noexport"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every mode, alternating")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args, args.child)
        return
    modes = args.tracing.split(",")
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    forwarded = sys.argv[1:]
    for round_no in range(args.rounds):
        for mode in modes:
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *forwarded, "--child", mode],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[mode].append(result["cpu_us_per_publication"])
            print(
                f"round {round_no} {mode:12s} CPU per publication "
                f"{result['cpu_us_per_publication']:7.1f} us "
                f"({result['publications_per_s']:,.0f} publications/s)",
                flush=True,
            )
    for mode, figures in results.items():
        print(
            f"{mode:12s} median {statistics.median(figures):.1f} us "
            f"(min {min(figures):.1f}, max {max(figures):.1f}) over {len(figures)} rounds, "
            f"{args.rooms} rooms of {args.members}"
        )


if __name__ == "__main__":
    main()
