"""Heartbeats are exact: a ping pingInterval after the handshake or the last pong, a silent
session closed pingTimeout after its ping; coalesced on a tick that may fire early, never late."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import websockets

from roomcast.connection import TIMER_TICK, Connection, Flusher
from roomcast.metrics import Metrics
from roomcast.transport.http import Request
from roomcast.types import SessionId
from wire import running

INTERVAL, TIMEOUT = 0.3, 0.2
SLACK = 0.02  # what the issue allows either side; the tick itself only ever fires early
TIMERS = {"ping_interval_ms": 300, "ping_timeout_ms": 200, "auth_required": False}


async def test_websocket_pings_come_every_ping_interval() -> None:
    """Over a WebSocket that answers each ping at once, every ping comes pingInterval
    (± 20 ms) after the handshake or the previous pong."""
    async with running(**TIMERS) as node:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=websocket"
        )
        opened = await ws.recv()
        last = time.perf_counter()
        assert str(opened).startswith("0")
        gaps = []
        for _ in range(4):
            message = await asyncio.wait_for(ws.recv(), 2)
            now = time.perf_counter()
            assert message == "2", message
            gaps.append(now - last)
            await ws.send("3")
            last = time.perf_counter()
        await ws.close()
    for gap in gaps:
        assert INTERVAL - SLACK <= gap <= INTERVAL + SLACK, [round(g * 1000) for g in gaps]


async def test_a_silent_websocket_session_is_closed_by_interval_plus_timeout() -> None:
    """A WebSocket client that never pongs is closed within pingInterval + pingTimeout
    (+ 20 ms) of its handshake, not later."""
    async with running(**TIMERS) as node:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=websocket"
        )
        await ws.recv()
        opened = time.perf_counter()
        try:
            async with asyncio.timeout(2):
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed:
            closed = time.perf_counter() - opened
        assert closed <= INTERVAL + TIMEOUT + SLACK, f"closed after {closed * 1000:.0f} ms"
        assert closed >= INTERVAL + TIMEOUT - 2 * TIMER_TICK, f"closed at {closed * 1000:.0f} ms"


async def test_a_silent_polling_session_is_gone_at_interval_plus_timeout() -> None:
    """As the official suite checks: a polling GET sent pingInterval + pingTimeout after the
    handshake, by a client that never ponged, is refused with 400 (unknown session)."""
    async with running(**TIMERS) as node, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        async with session.get(base) as response:
            handshake = json.loads((await response.text())[1:])
        opened = time.perf_counter()
        await asyncio.sleep(INTERVAL + TIMEOUT - (time.perf_counter() - opened))
        async with session.get(f"{base}&sid={handshake['sid']}") as response:
            assert response.status == 400, await response.text()


async def test_ten_thousand_heartbeats_share_few_wake_ups() -> None:
    """10,000 connections whose heartbeats start across one second of loop time wake the
    loop at most once per tick (51 deadlines), each deadline no later than its exact time."""
    flusher = Flusher()
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    conns: list[Connection] = []
    exact: list[tuple[float, float]] = []
    started = loop.time()
    for i in range(10_000):
        conn = Connection(
            SessionId(f"s{i}"),
            Request("GET", "/socket.io/", {}, {}),
            ping_interval=25,
            ping_timeout=20,
            limit=1 << 20,
            flusher=flusher,
            metrics=metrics,
            on_closed=lambda _conn, _reason: None,
        )
        before = loop.time()
        conn.start_heartbeat()
        exact.append((before + 25, loop.time() + 25))  # the exact time lies in between
        conns.append(conn)
        if i % 200 == 0:
            await asyncio.sleep(0.02)
    spread = loop.time() - started
    deadlines = [c._timer.when() for c in conns if c._timer is not None]
    assert len(deadlines) == 10_000
    for deadline, (earliest, latest) in zip(deadlines, exact, strict=True):
        assert earliest - TIMER_TICK - 1e-6 <= deadline <= latest + 1e-6
    wakeups = len(set(deadlines))
    assert wakeups <= spread / TIMER_TICK + 2, (wakeups, spread)
    for conn in conns:
        conn.close("test over", notify=False)
