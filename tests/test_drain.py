"""Draining: not ready first, then clients told to leave gradually, each CLOSE after a PING
round trip; many polling sessions closed in O(1) each."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp
import pytest

from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast.connection import Connection, Flusher
from roomcast.engine import EngineOptions, EngineServer
from roomcast.metrics import Metrics
from roomcast.transport.http import Request
from roomcast.types import SessionId
from wire import Raw, publish, running


class _Quiet:
    """A raw Engine.IO application that does nothing."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def on_message(self, message: str | bytes) -> None:
        return

    def on_close(self, reason: str) -> None:
        return


def _engine(ping_interval_ms: int, ping_timeout_ms: int) -> EngineServer:
    options = EngineOptions(ping_interval_ms=ping_interval_ms, ping_timeout_ms=ping_timeout_ms)
    return EngineServer(options, _Quiet, Metrics(), Flusher())


async def test_closing_twenty_thousand_polling_sessions_is_linear() -> None:
    """20,000 polling sessions closed at once (a drain) each keep their CLOSE packet for the
    next poll, in well under a second (17 s before: the farewell map was rebuilt per close)."""
    engine = _engine(25_000, 20_000)
    request = Request("GET", "/socket.io/", {}, {})
    for i in range(20_000):
        engine.add_session(SessionId(f"s{i}"), request)
    started = time.perf_counter()
    engine.close_all("server shutting down")
    elapsed = time.perf_counter() - started
    assert len(engine.farewells) == 20_000 and not engine.sessions
    assert engine.farewells["s0"][1].endswith("1")  # the CLOSE packet waits for the poll
    assert elapsed < 2, f"20,000 closes took {elapsed:.2f} s"


async def test_expired_farewells_are_forgotten() -> None:
    """A farewell nobody collected is dropped once pingInterval + pingTimeout have passed."""
    engine = _engine(5, 5)
    request = Request("GET", "/socket.io/", {}, {})
    for i in range(3):
        engine.add_session(SessionId(f"old{i}"), request).close("test")
    await asyncio.sleep(0.05)
    engine.add_session(SessionId("new"), request).close("test")
    assert set(engine.farewells) == {"new"}


# --------------------------------------------------------------------------- the node's drain


async def _joined(port: int, room: str = "doc:1", *, pong: bool = True) -> Raw:
    """A Socket.IO client in ``room``, over a raw WebSocket."""
    raw = await Raw.connect(port, pong=pong)
    await raw.send("40" + json.dumps({"token": token_for("doc:*")}))
    assert str(await raw.recv()).startswith("40")
    await raw.send(f'421["join","{room}"]')
    assert await raw.recv() == '431[{"ok":true}]'
    return raw


async def _status(port: int, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status


async def test_drain_turns_unready_first_and_serves_everyone_during_the_delay() -> None:
    """Right after SIGTERM /readyz answers 503 while clients still get events and new clients
    still connect; only once the delay is over are they told to leave, and the port closes."""
    async with running(drain_delay_s=60.0) as node:
        old = await _joined(node.port)
        hurry = asyncio.Event()
        drain = asyncio.create_task(node.drain(hurry))
        await eventually(lambda: node.draining, what="the drain to start")
        assert await _status(node.port, "/readyz") == 503
        assert await _status(node.port, "/healthz") == 200
        new = await _joined(node.port)  # a balancer that has not noticed yet still sends some
        assert (await publish(node.port, {"room": "doc:1", "event": "e", "data": 1}))[0] == 202
        for raw in (old, new):
            assert json.loads(str(await raw.recv())[2:])[:2] == ["e", 1]
        assert not drain.done() and len(node.engine.sessions) == 2
        hurry.set()  # a second signal: the rest of the delay is skipped
        assert await old.closed() and await new.closed()
        await asyncio.wait_for(drain, 5)
        with pytest.raises(OSError):
            await Raw.connect(node.port)


async def test_clients_are_told_to_leave_at_a_steady_rate_over_the_window() -> None:
    """With a 1.5 s window, 150 clients leave over it in many small steps, not in one instant,
    and the last ones only near its end."""
    async with running(drain_window_s=1.5) as node:
        clients = [await _joined(node.port) for _ in range(150)]
        remaining: list[tuple[float, int]] = []
        loop = asyncio.get_running_loop()
        drain = asyncio.create_task(node.drain())
        started = loop.time()
        while not drain.done():
            remaining.append((loop.time() - started, len(node.engine.sessions)))
            await asyncio.sleep(0.02)
        counts = [count for _, count in remaining]
        steps = sum(1 for a, b in itertools.pairwise(counts) if b < a)
        assert steps >= 10, remaining
        assert max(a - b for a, b in itertools.pairwise(counts)) <= 150 // 3, remaining
        some_left = [t for t, count in remaining if count > 0]
        assert some_left[-1] >= 1.0, remaining  # clients were still being told near the end
        for raw in clients:
            assert await raw.closed()


async def test_a_dismissed_client_gets_its_close_alone_after_a_ping_round_trip() -> None:
    """A client told to leave gets what was queued, then a PING and nothing else (a later
    event is not sent: it recovers it elsewhere); the CLOSE comes alone once it answers."""
    async with running() as node:
        raw = await _joined(node.port, pong=False)
        (conn,) = node.engine.sessions.values()
        await publish(node.port, {"room": "doc:1", "event": "e", "data": 1})
        await eventually(lambda: conn.has_output() is False, what="the event to be written")
        conn.dismiss("server shutting down")
        assert json.loads(str(await raw.ws.recv())[2:])[:2] == ["e", 1]
        assert await raw.ws.recv() == "2"
        await publish(node.port, {"room": "doc:1", "event": "e", "data": 2})
        dropped = node.metrics.registry.get_sample_value(
            "roomcast_dropped_messages_total", {"reason": "dismissed"}
        )
        await eventually(
            lambda: (
                node.metrics.registry.get_sample_value(
                    "roomcast_dropped_messages_total", {"reason": "dismissed"}
                )
                == 1
            ),
            what=f"the later event to be dropped and counted (was {dropped})",
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await raw.ws.recv()  # nothing until the PONG
        await raw.send("3")
        assert await raw.ws.recv() == "1"
        assert await raw.closed()


async def test_a_dismissed_polling_client_gets_its_close_in_a_payload_of_its_own() -> None:
    """Over long-polling, the CLOSE comes in an answer of its own, after the PONG to the PING
    that followed the last event."""
    async with running() as node, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        async with http.get(base) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        url = f"{base}&sid={sid}"

        async def post(body: str) -> None:
            async with http.post(url, data=body) as answer:
                assert await answer.text() == "ok"

        async def poll() -> list[str]:
            async with http.get(url) as answer:
                return (await answer.text()).split("\x1e")

        await post("40" + json.dumps({"token": token_for("doc:*")}))
        assert (await poll())[0].startswith("40")
        await post('421["join","doc:1"]')
        assert await poll() == ['431[{"ok":true}]']
        (conn,) = node.engine.sessions.values()
        await publish(node.port, {"room": "doc:1", "event": "e", "data": 1})
        await eventually(lambda: conn.has_output(), what="the event to be queued")
        conn.dismiss("server shutting down")
        before_pong = await poll()
        if before_pong[-1] != "2":
            before_pong += await poll()  # the PING came in an answer of its own
        assert before_pong[-1] == "2" and len(before_pong) == 2, before_pong
        assert json.loads(before_pong[0][2:])[:2] == ["e", 1], before_pong
        await post("3")
        assert await poll() == ["1"]


async def test_a_hurried_drain_with_a_polling_farewell_ends() -> None:
    """A second signal while a polling client's CLOSE waits for its next poll ends the drain
    at once (it spun forever, never yielding, before); the node keeps serving meanwhile."""
    async with (
        running(drain_delay_s=60.0, drain_seconds=5.0) as node,
        aiohttp.ClientSession() as session,
    ):
        url = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        async with session.get(url) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        hurry = asyncio.Event()
        drain = asyncio.create_task(node.drain(hurry))
        await eventually(lambda: node.draining, what="the drain to start")
        hurry.set()
        await asyncio.wait_for(drain, 4)  # it never ended before
        async with session.get(f"{url}&sid={sid}") as response:
            assert response.status in (200, 400)  # its CLOSE, or already forgotten
