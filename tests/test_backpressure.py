"""Backpressure: a client that stops reading is disconnected; the others are not slowed."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import socket

from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast.connection import TIMER_TICK, Connection, Flusher
from roomcast.hub import Hub
from roomcast.metrics import Metrics
from roomcast.protocol.engineio import PacketType
from roomcast.transport.http import Request
from roomcast.transport.websocket import text_frame
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId
from wire import connect_sio, publish, running


async def _stalled_client(port: int, token: str) -> socket.socket:
    """A WebSocket client that connects, joins doc:1, then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /socket.io/?EIO=4&transport=websocket&token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await asyncio.sleep(0)

    def frame(text: str) -> bytes:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x81, 0x80 | len(payload)]) + mask + masked

    sock.sendall(frame("40") + frame('421["join","doc:1"]'))
    return sock


async def _was_reset(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer reset the connection, seen without reading (reading would un-stall it)."""
    for _ in range(int(seconds / 0.05)):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_slow_client_is_disconnected_and_others_get_everything() -> None:
    """A member that stops reading is dropped with a counted reason; a reading member gets all."""
    async with running(outbound_buffer_limit=64 * 1024, recovery_max_disconnection_ms=0) as node:
        reader = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert (await reader.recv()).startswith("40")
        await reader.send('421["join","doc:1"]')
        assert await reader.recv() == '431[{"ok":true}]'
        stalled = await _stalled_client(node.port, token_for("doc:*"))
        for _ in range(200):
            if len(node.hub.rooms.get(("/", "doc:1"), ())) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(node.hub.rooms[("/", "doc:1")]) == 2
        blob = "x" * 20_000
        count = 400
        received = 0

        async def read_all() -> None:
            nonlocal received
            while received < count:
                message = await reader.recv(timeout=20)
                assert json.loads(str(message)[2:])[1]["i"] == received
                received += 1

        reading = asyncio.create_task(read_all())
        for i in range(count):
            status, _ = await publish(
                node.port, {"room": "doc:1", "event": "big", "data": {"i": i, "b": blob}}
            )
            assert status == 202
        await asyncio.wait_for(reading, 30)
        assert received == count
        slow = node.metrics.registry.get_sample_value("roomcast_slow_client_disconnects_total")
        assert slow == 1
        lost = node.metrics.registry.get_sample_value(
            "roomcast_dropped_messages_total", {"reason": "slow_client"}
        )
        assert lost is not None and lost >= 1, "the slow client's queued messages are counted"
        assert len(node.hub.rooms[("/", "doc:1")]) == 1
        # The server aborted the stalled connection rather than waiting behind its buffer.
        assert await _was_reset(stalled, 5.0), "the stalled connection was not aborted"
        stalled.close()


class _RecordingTransport:
    """Just enough of an asyncio transport to see which writes a connection makes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    buffered = 0
    """What the transport pretends is still waiting for the socket."""

    def get_extra_info(self, name: str) -> object:
        return None

    def close(self) -> None:
        self.writes.append(b"<closed>")

    def abort(self) -> None:
        self.writes.append(b"<aborted>")


def _websocket_connection(
    flusher: Flusher, name: str, *, ping_interval: float = 25
) -> tuple[Connection, _RecordingTransport]:
    """A WebSocket connection whose transport records what is written to it."""
    transport = _RecordingTransport()
    conn = Connection(
        SessionId(name),
        Request("GET", "/socket.io/", {}, {}),
        ping_interval=ping_interval,
        ping_timeout=20,
        limit=1 << 20,
        flusher=flusher,
        metrics=Metrics(),
        on_closed=lambda _conn, _reason: None,
    )
    conn.use_websocket(WebSocketConnection(transport, None, 1 << 20))  # type: ignore[arg-type]
    return conn, transport


async def test_idle_connections_write_at_once_and_busy_ones_coalesce() -> None:
    """A broadcast frame to a connection that sent nothing in this loop iteration or the one
    before is written at once; frames to a busy connection become one write per iteration."""
    flusher = Flusher()
    conn, transport = _websocket_connection(flusher, "s1")
    for _ in range(3):  # let anything queued by the switch to WebSocket go out
        await asyncio.sleep(0)
    transport.writes.clear()

    conn.send_encoded(b"a", "a")  # idle: written before the broadcast loop moves on
    assert transport.writes == [b"a"]
    conn.send_encoded(b"b", "b")  # same iteration: queued
    conn.send_encoded(b"c", "c")
    assert transport.writes == [b"a"]
    await asyncio.sleep(0)  # next iteration: one write for both
    assert transport.writes == [b"a", b"bc"]
    conn.send_encoded(b"d", "d")  # sent just before: still busy, queued
    assert transport.writes == [b"a", b"bc"]
    await asyncio.sleep(0)
    assert transport.writes == [b"a", b"bc", b"d"]
    for _ in range(3):  # a few quiet iterations
        await asyncio.sleep(0)
    conn.send_encoded(b"e", "e")  # idle again: at once
    assert transport.writes == [b"a", b"bc", b"d", b"e"]
    with flusher.batch():  # a broker delivering several publications: one write for all
        for _ in range(3):
            await asyncio.sleep(0)
        conn.send_encoded(b"f", "f")
        conn.send_encoded(b"g", "g")
    await asyncio.sleep(0)
    assert transport.writes == [b"a", b"bc", b"d", b"e", b"fg"]


class _Member:
    """What the hub needs of a socket: its connection and its id."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.id = conn.sid


async def test_broadcast_fans_out_to_idle_and_busy_members_and_drops_an_overflowing_one() -> None:
    """One broadcast (the hub's unrolled fast path): idle members get the frame at once, a busy
    one gets it coalesced with what it already had, the excluded socket gets nothing, and a
    member whose transport buffer went over the limit is closed with its loss counted."""
    flusher = Flusher()
    hub = Hub(lambda key: None, lambda key: None, flusher)
    room = ("/", "doc:1")
    members = [_websocket_connection(flusher, f"s{i}") for i in range(5)]
    for conn, _ in members:
        hub.join(_Member(conn), room)  # type: ignore[arg-type]
    for _ in range(3):  # let anything queued by the switch to WebSocket go out
        await asyncio.sleep(0)
    (_, idle_t), (busy, busy_t), (excluded, excluded_t), (full, full_t), pinged = members
    for _, transport in members:
        transport.writes.clear()
    busy.send_encoded(b"before", "before")  # busy now: the broadcast frame is queued behind it
    busy.send_encoded(b"queued", "queued")
    full_t.buffered = full.limit + 1  # the socket stopped draining
    pinged[0].send_packet(PacketType.PING)  # a control frame is queued: the broadcast follows it

    sent = hub.broadcast(room, "ev", {"n": 1}, exclude=excluded.sid)

    assert sent == 4
    frame = text_frame(b'42["ev",{"n":1}]')
    assert idle_t.writes == [frame], "an idle member is written at once"
    assert busy_t.writes == [b"before"], "a busy member's frame waits for the flusher"
    assert excluded_t.writes == []
    assert full_t.writes == [frame]
    await asyncio.sleep(0)
    assert busy_t.writes == [b"before", b"queued" + frame], "one write for what was queued"
    assert pinged[1].writes == [text_frame(b"2") + frame], "the broadcast did not overtake"
    await asyncio.sleep(0)
    assert full_t.writes[-1] == b"<aborted>", "the overflowing member is dropped at once"
    assert full.closed
    dropped = full._metrics.registry.get_sample_value(
        "roomcast_dropped_messages_total", {"reason": "slow_client"}
    )
    assert dropped == 1
    assert idle_t.writes == [frame] and excluded_t.writes == []


async def test_broadcasts_follow_each_members_last_send_through_the_hub() -> None:
    """Through the hub's fast path: a member written at once is busy for the rest of the
    iteration (a second broadcast is coalesced), idle again after quiet iterations (written at
    once, twice in a row), held inside ``Flusher.batch()``; a closed member gets nothing and
    each drop is counted."""
    flusher = Flusher()
    hub = Hub(lambda key: None, lambda key: None, flusher)
    room = ("/", "doc:1")
    (conn, transport), (gone, gone_t) = [_websocket_connection(flusher, f"s{i}") for i in (1, 2)]
    for member in (conn, gone):
        hub.join(_Member(member), room)  # type: ignore[arg-type]

    async def quiet() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    await quiet()
    gone.close("gone", notify=False)  # still in the room: the node would remove it later
    transport.writes.clear()
    gone_t.writes.clear()
    frames = [text_frame(b'42["ev",{"n":%d}]' % n) for n in range(6)]

    hub.broadcast(room, "ev", {"n": 0})
    hub.broadcast(room, "ev", {"n": 1})
    assert transport.writes == frames[:1], "the second broadcast of the iteration is queued"
    await asyncio.sleep(0)
    assert transport.writes == frames[:2]
    for n in (2, 3):
        await quiet()
        hub.broadcast(room, "ev", {"n": n})
        assert transport.writes == frames[: n + 1], f"broadcast {n} is written at once"
    await quiet()
    with flusher.batch():
        hub.broadcast(room, "ev", {"n": 4})
        hub.broadcast(room, "ev", {"n": 5})
        assert transport.writes == frames[:4], "nothing is written at once inside a batch"
    await asyncio.sleep(0)
    assert transport.writes == [*frames[:4], frames[4] + frames[5]]
    assert gone_t.writes == []
    dropped = gone._metrics.registry.get_sample_value(
        "roomcast_dropped_messages_total", {"reason": "connection_closed"}
    )
    assert dropped == 6


async def test_heartbeat_deadlines_fall_on_a_shared_tick() -> None:
    """Heartbeat timers are rounded down to TIMER_TICK: connections whose pings are due within
    one tick ping in the same loop iteration (one wake-up), none pings late, and none more than
    one tick early."""
    flusher = Flusher()
    loop = asyncio.get_running_loop()
    conns = [
        _websocket_connection(flusher, f"s{interval}", ping_interval=interval)
        for interval in (0.011, 0.017, 0.029)
    ]
    started = loop.time()
    for conn, _ in conns:
        conn.start_heartbeat()
    ended = loop.time()
    deadlines = [conn._timer.when() for conn, _ in conns if conn._timer is not None]
    assert len(deadlines) == 3
    for deadline, interval in zip(deadlines, (0.011, 0.017, 0.029), strict=True):
        ticks = deadline / TIMER_TICK
        assert abs(ticks - round(ticks)) < 1e-6, deadline
        assert started + interval - TIMER_TICK <= deadline <= ended + interval
    assert len(set(deadlines)) <= 2  # three deadlines within 18 ms share at most two ticks
    ping = text_frame(b"2")
    await eventually(
        lambda: all(ping in transport.writes for _, transport in conns), what="three pings"
    )
    for conn, _ in conns:
        conn.close("test over", notify=False)
