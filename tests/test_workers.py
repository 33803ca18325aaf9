"""`roomcast serve --workers 2`: one port, a shared Redis, polling sessions reach their worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import multi_fixtures
import pytest
from process_output import ProcessOutput

import redis_fixtures
from conftest_helpers import token_for
from redis_fixtures import eventually, free_port
from roomcast.node import Node
from roomcast.transport.http import Exchange, HttpConnection, Request
from wire import API_KEY, SECRET

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
node_clients = multi_fixtures.node_clients

pytestmark = pytest.mark.redis


@contextlib.contextmanager
def _serve(redis_url: str, redis_prefix: str, *extra: str) -> Iterator[int]:
    """``roomcast serve --workers 2`` on a free port; yields the port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env.update(ROOMCAST_JWT_SECRET=SECRET, ROOMCAST_API_KEY=API_KEY)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roomcast",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--drain-seconds",
            "1",
            "--drain-delay-s",
            "0",
            "--drain-window-s",
            "0",
            "--redis-url",
            redis_url,
            "--redis-prefix",
            redis_prefix,
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with proc:
        assert proc.stdout is not None
        output = ProcessOutput(proc.stdout)
        output.wait_for("ready line from each worker", lambda lines: len(_ready(lines)) == 2, 20)
        yield port
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def two_workers(redis_url: str, redis_prefix: str) -> Iterator[int]:
    with _serve(redis_url, redis_prefix) as port:
        yield port


def _ready(lines: list[str]) -> set[str]:
    """The pids of the workers whose whole ``roomcast ready`` line is in ``lines``."""
    return {
        match.group(1)
        for line in lines
        if (match := re.fullmatch(r"roomcast ready on \S+ \(pid (\d+)\)\n", line))
    }


def _get(url: str) -> str:
    # a fresh TCP connection per request, so the kernel spreads them over both workers
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Connection": "close"}), timeout=10
    ) as r:
        return str(r.read().decode())


def _post(url: str, body: str) -> str:
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Connection": "close"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return str(r.read().decode())


def test_polling_sessions_work_across_workers(two_workers: int) -> None:
    """Polling requests on new connections land on either worker and still reach their session."""
    base = f"http://127.0.0.1:{two_workers}/socket.io/?EIO=4&transport=polling"
    sessions: list[str] = []
    owners: set[str] = set()
    # Handshakes land where the kernel puts them; go on until both workers own sessions.
    for _ in range(60):
        if len(sessions) >= 6 and len(owners) == 2:
            break
        sid = json.loads(_get(base)[1:])["sid"]
        owners.add(sid[:2])
        url = f"{base}&sid={sid}"
        assert _post(url, "40" + json.dumps({"token": token_for("doc:*")})) == "ok"
        assert _get(url).startswith('40{"sid"')
        assert _post(url, '421["join","doc:1"]') == "ok"
        assert _get(url) == '431[{"ok":true}]'
        sessions.append(url)
    assert owners == {"00", "01"}, "sessions should be spread over both workers"
    request = urllib.request.Request(
        f"http://127.0.0.1:{two_workers}/api/v1/publish",
        data=json.dumps({"room": "doc:1", "event": "e", "data": {"n": 1}}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 202
    for url in sessions:
        packet = _get(url)
        assert json.loads(packet[2:])[:2] == ["e", {"n": 1}]


def _samples(exposition: str, name: str) -> dict[str, float]:
    """``name``'s sample values in a Prometheus exposition, by their ``worker`` label."""
    found: dict[str, float] = {}
    for line in exposition.splitlines():
        match = re.fullmatch(rf'{name}\{{(?:.*,)?worker="(\d+)"(?:,.*)?\}} (\S+)', line)
        if match:
            found[match.group(1)] = found.get(match.group(1), 0.0) + float(match.group(2))
    return found


def test_metrics_and_readiness_answer_for_every_worker(two_workers: int) -> None:
    """Scrapes land on either worker; each one reports both workers, labelled, so counters
    add up to what the whole instance did, whichever worker answered."""
    base = f"http://127.0.0.1:{two_workers}"
    published = 12
    for n in range(published):  # a fresh connection each: the kernel spreads them
        request = urllib.request.Request(
            f"{base}/api/v1/publish",
            data=json.dumps({"room": "doc:1", "event": "e", "data": {"n": n}}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Connection": "close"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 202
    for _ in range(6):
        exposition = _get(f"{base}/metrics")
        assert _samples(exposition, "roomcast_worker_up") == {"00": 1.0, "01": 1.0}
        by_worker = _samples(exposition, "roomcast_published_total")
        assert sum(by_worker.values()) == published, exposition
        ready = json.loads(_get(f"{base}/readyz"))
        assert ready["ready"] is True
        assert {w: d["broker"] for w, d in ready["workers"].items()} == {
            "00": "connected",
            "01": "connected",
        }
    own = _get(f"{base}/metrics?scope=worker")
    assert "roomcast_worker_up" not in own and 'worker="' not in own
    assert "roomcast_published_total" in own


async def test_a_pipe_to_another_worker_passes_backpressure_on(tmp_path: Path) -> None:
    """A client that stops reading, piped to the worker that owns its session, stops that
    pipe reading from the worker: the worker's own buffer limit then sees the slow client,
    and the forwarding process does not buffer the backlog."""
    loop = asyncio.get_running_loop()
    written = 0
    flood = 32 << 20
    head_seen = asyncio.Event()

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        head_seen.set()
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            while written < flood:
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()

    unix_path = str(tmp_path / "owner.sock")
    owner_server = await asyncio.start_unix_server(owner, unix_path)

    class Forward:
        def handle(self, request: Request, exchange: Exchange) -> None:
            exchange.forward(request, unix_path)

    front = await loop.create_server(lambda: HttpConnection(Forward()), "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        await asyncio.wait_for(head_seen.wait(), 5)
        await asyncio.sleep(1.5)  # the client reads nothing
        assert written < 8 << 20, f"the owner could write {written} bytes to a stalled client"
    finally:
        client.close()
        front.close()
        owner_server.close()


@pytest.fixture
def two_quick_workers(redis_url: str, redis_prefix: str) -> Iterator[int]:
    """Two workers pinging every 300 ms, so a test sees heartbeats cross a handoff."""
    with _serve(
        redis_url, redis_prefix, "--ping-interval-ms", "300", "--ping-timeout-ms", "400"
    ) as port:
        yield port


def _frame(text: str) -> bytes:
    """A masked client text frame (mask key 0, so the payload goes as is)."""
    payload = text.encode()
    if len(payload) < 126:
        head = bytes((0x81, 0x80 | len(payload)))
    else:
        head = bytes((0x81, 0x80 | 126)) + len(payload).to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def _room_of(worker: int, taken: set[str]) -> str:
    """A room that ``worker`` owns, not one of ``taken``."""
    from roomcast.handoff import owner

    for n in range(1000):
        room = f"doc:{n}"
        if owner(room, 2) == worker and room not in taken:
            return room
    raise AssertionError("no room found")


async def test_a_websocket_session_moves_to_the_worker_that_owns_its_room(
    two_quick_workers: int,
) -> None:
    """A socket joining a room that the other worker owns moves there on the same TCP
    connection: what it sent with the join (even half a frame) is handled in order, the
    heartbeat goes on, it receives the room's publications, and it recovers after a drop."""
    from wire import Raw

    port = two_quick_workers
    moved = 0
    while moved < 2:  # until two sessions started on the worker that does not own their room
        raw = await Raw.connect(port)
        start = int(raw.handshake["sid"][:2])
        await raw.send("40" + json.dumps({"token": token_for("doc:*")}))
        connected = await raw.recv()
        assert isinstance(connected, str) and connected.startswith("40"), connected
        pid = json.loads(connected[2:])["pid"]
        first = _room_of(1 - start, set())
        second = _room_of(1 - start, {first})
        # The join, a second join and the first bytes of a leave, in one write: the worker reads
        # them together and must hand over all of it; the leave's rest comes later.
        leave = _frame(f'423["leave","{second}"]')
        raw.ws.transport.write(
            _frame(f'421["join","{first}"]') + _frame(f'422["join","{second}"]') + leave[:5]
        )
        await asyncio.sleep(0.2)
        raw.ws.transport.write(leave[5:])
        # Each join is answered once its room's subscription is live, so in either order.
        assert sorted([str(await raw.recv()) for _ in range(3)]) == [
            '431[{"ok":true}]',
            '432[{"ok":true}]',
            '433[{"ok":true}]',
        ]
        with pytest.raises(TimeoutError):  # three heartbeats, answered; nothing else comes
            async with asyncio.timeout(1.0):
                await raw.recv()
        # The leave was handled after the second join: that room sends nothing any more.
        status, body = await asyncio.to_thread(
            _publish, port, {"room": second, "event": "left", "data": {}}
        )
        assert status == 202, body
        status, body = await asyncio.to_thread(
            _publish, port, {"room": first, "event": "e", "data": {"n": 1}}
        )
        assert status == 202, body
        message = await raw.recv()
        assert isinstance(message, str)
        assert json.loads(message[2:]) == ["e", {"n": 1}, body["offset"]]
        moved += 1
        # Dropped, then back: the recovery state written by the new worker names the room.
        await raw.ws.close()
        status, missed = await asyncio.to_thread(
            _publish, port, {"room": first, "event": "e", "data": {"n": 2}}
        )
        assert status == 202, missed
        back = await Raw.connect(port)
        await back.send(
            "40" + json.dumps({"token": token_for("doc:*"), "pid": pid, "offset": body["offset"]})
        )
        answer = await back.recv()
        assert isinstance(answer, str) and json.loads(answer[2:])["pid"] == pid, answer
        replayed = await back.recv()
        assert isinstance(replayed, str)
        assert json.loads(replayed[2:]) == ["e", {"n": 2}, missed["offset"]]
        await back.close()
    exposition = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    handoffs = _handoffs(exposition)
    assert handoffs["sent"] >= 2 and handoffs["received"] == handoffs["sent"], exposition
    assert handoffs["kept"] == handoffs["failed"] == 0, exposition


def _handoffs(exposition: str) -> dict[str, float]:
    """``roomcast_handoffs_total`` by result, summed over the workers (if labelled)."""
    found = dict.fromkeys(("sent", "received", "kept", "failed"), 0.0)
    for line in exposition.splitlines():
        match = re.fullmatch(
            r'roomcast_handoffs_total\{result="(\w+)"(?:,worker="\d+")?\} (\S+)', line
        )
        if match:
            found[match.group(1)] += float(match.group(2))
    return found


def _publish(port: int, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/publish",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Connection": "close"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status, json.loads(r.read())


@contextlib.asynccontextmanager
async def _worker_zero(tmp_path: Path) -> AsyncIterator[Node]:
    """Worker 0 of two, in this process; worker 1 is never started."""
    from wire import settings

    sockets = (str(tmp_path / "worker-0.sock"), str(tmp_path / "worker-1.sock"))
    node = Node(settings(), worker=(0, sockets))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def test_a_session_that_cannot_move_joins_where_it_is(tmp_path: Path) -> None:
    """The worker that owns the room is not there: the session stays, the join is answered
    here, what was read with it is handled in order, and the stay is counted."""
    from prometheus_client import generate_latest

    from wire import connect_sio, publish

    async with _worker_zero(tmp_path) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await raw.recv()).startswith("40")
        room = _room_of(1, set())
        raw.ws.transport.write(_frame(f'421["join","{room}"]') + _frame('422["nope"]'))
        answers = sorted([str(await raw.recv()), str(await raw.recv())])
        assert answers[0] == '431[{"ok":true}]', answers
        assert json.loads(answers[1][3:])[0]["error"]["code"] == "unknown_event", answers
        status, body = await publish(node.port, {"room": room, "event": "e", "data": 1})
        assert status == 202, body
        assert json.loads(str(await raw.recv())[2:]) == ["e", 1, body["offset"]]
        handoffs = _handoffs(generate_latest(node.metrics.registry).decode())
        assert handoffs == {"sent": 0.0, "received": 0.0, "kept": 1.0, "failed": 0.0}
        await raw.close()


@pytest.mark.interop
def test_official_clients_upgrade_join_and_receive_across_workers(
    two_workers: int, node_clients: multi_fixtures.NodeClients
) -> None:
    """socket.io-client with its default transports (polling, then an upgrade that may land on
    either worker): every socket joins, moves or not, and receives its room's events."""
    url = f"http://127.0.0.1:{two_workers}"
    names = [f"c{i}" for i in range(10)]
    for name in names:
        node_clients.connect(name, url, token_for("doc:*"))
    time.sleep(0.3)  # the upgrades, in the background
    for i, name in enumerate(names):
        node_clients.join(name, f"doc:{i % 4}")
    for room in range(4):
        status, body = _publish(two_workers, {"room": f"doc:{room}", "event": "e", "data": room})
        assert status == 202, body
    for i, name in enumerate(names):
        events = node_clients.wait_events(name, 1)
        assert [(e["event"], e["data"]) for e in events] == [("e", i % 4)], events
        assert node_clients.state(name)["connected"] is True
    handoffs = _handoffs(_get(f"{url}/metrics"))
    assert handoffs["received"] == handoffs["sent"] and handoffs["failed"] == 0, handoffs


async def test_a_session_that_closes_while_moving_keeps_its_join(tmp_path: Path) -> None:
    """The client closes in the same read as its join: the session stays, the join counts (its
    recovery state names the room), and a recovering client gets what it missed there."""
    from prometheus_client import generate_latest

    from wire import Raw, connect_sio, publish

    async with _worker_zero(tmp_path) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        room = _room_of(1, set())
        close = bytes((0x88, 0x82)) + b"\0\0\0\0" + (1000).to_bytes(2, "big")
        raw.ws.transport.write(_frame(f'421["join","{room}"]') + close)
        await eventually(
            lambda: not node.sockets.sockets, what="the server to notice the dropped connection"
        )
        await node.sockets.session_writer.flush()
        status, body = await publish(node.port, {"room": room, "event": "e", "data": 1})
        assert status == 202, body
        back = await Raw.connect(node.port)
        await back.send(
            "40" + json.dumps({"token": token_for("doc:*"), "pid": hello["pid"], "offset": "0"})
        )
        assert json.loads(str(await back.recv())[2:])["pid"] == hello["pid"]
        assert json.loads(str(await back.recv())[2:]) == ["e", 1, body["offset"]]
        handoffs = _handoffs(generate_latest(node.metrics.registry).decode())
        assert handoffs == {"sent": 0.0, "received": 0.0, "kept": 1.0, "failed": 0.0}
        await back.close()


async def test_a_join_sent_with_the_connect_does_not_move(tmp_path: Path) -> None:
    """Packets that wait for their namespace's CONNECT are handled in order, here: a join
    among them is not offered to another worker."""
    from prometheus_client import generate_latest

    from wire import Raw

    async with _worker_zero(tmp_path) as node:
        raw = await Raw.connect(node.port)
        room = _room_of(1, set())
        connect = "40" + json.dumps({"token": token_for("doc:*")})
        raw.ws.transport.write(_frame(connect) + _frame(f'421["join","{room}"]'))
        assert str(await raw.recv()).startswith("40")
        assert await raw.recv() == '431[{"ok":true}]'
        handoffs = _handoffs(generate_latest(node.metrics.registry).decode())
        assert handoffs == {"sent": 0.0, "received": 0.0, "kept": 0.0, "failed": 0.0}
        await raw.close()
