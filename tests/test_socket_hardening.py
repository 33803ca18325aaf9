"""Joins, recovery and connect hooks under hostile or broken input (issue: hardening)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

import redis_fixtures
from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast import Application, Socket
from roomcast.sessions import session_key
from wire import Raw, connect_sio, running

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix


async def _drop(node: Any, raw: Raw) -> None:
    """Cut the client's TCP connection as a network failure would; wait for its saved state."""
    raw.ws.transport.abort()
    await eventually(lambda: not node.sockets.sockets, what="the server to notice the drop")
    await node.sockets.session_writer.flush()


async def _healthz_probe(port: int, stop: asyncio.Event, worst: list[float]) -> None:
    """Ask /healthz every 50 ms until ``stop``; keep the slowest answer's seconds in ``worst``."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            worst[0] = max(worst[0], time.perf_counter() - started)
            await asyncio.sleep(0.05)


async def test_many_joins_cost_linear_time_and_the_server_stays_responsive() -> None:
    """8,000 joins of one socket finish in seconds, /healthz answers quickly meanwhile, and the
    recovery state saved afterwards holds every room (it took 33 s, quadratic, before)."""
    count = 8000
    async with running(max_rooms_per_socket=count) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        stop, worst = asyncio.Event(), [0.0]
        probe = asyncio.create_task(_healthz_probe(node.port, stop, worst))
        started = time.perf_counter()
        for i in range(count - 1):
            await raw.send(f'42["join","doc:{i}"]')
        await raw.send(f'421["join","doc:{count - 1}"]')
        assert await raw.recv(timeout=30) == '431[{"ok":true}]'
        elapsed = time.perf_counter() - started
        stop.set()
        await probe
        await node.sockets.session_writer.flush()
        state = await node.broker.take_session(session_key(hello["pid"], "alice"))
        assert state is not None and len(json.loads(state)["rooms"]) == count
        assert elapsed < 10, f"{count} joins took {elapsed:.1f} s"
        assert worst[0] < 2, f"/healthz took {worst[0]:.2f} s during the joins"


async def test_rooms_per_socket_are_capped_with_a_clear_ack() -> None:
    """A join past max_rooms_per_socket gets too_many_rooms and is counted; rejoining a room
    the socket is already in still works."""
    async with running(max_rooms_per_socket=2) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await raw.recv()).startswith("40")
        for ack, room in enumerate(("doc:1", "doc:2"), start=1):
            await raw.send(f'42{ack}["join","{room}"]')
            assert await raw.recv() == f'43{ack}[{{"ok":true}}]'
        await raw.send('423["join","doc:3"]')
        refused = json.loads(str(await raw.recv())[3:])[0]
        assert refused["ok"] is False and refused["error"]["code"] == "too_many_rooms"
        await raw.send('424["join","doc:1"]')
        assert await raw.recv() == '434[{"ok":true}]'
        assert ("/", "doc:3") not in node.hub.rooms
        value = node.metrics.registry.get_sample_value(
            "roomcast_refused_client_events_total", {"code": "too_many_rooms"}
        )
        assert value == 1


async def test_a_stolen_pid_neither_recovers_nor_wipes_the_owners_state() -> None:
    """Another user presenting alice's pid gets a fresh socket; alice still recovers afterwards."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        await _drop(node, raw)

        thief = await connect_sio(
            node.port, {"token": token_for("doc:*", user="mallory"), "pid": hello["pid"]}
        )
        stolen = json.loads(str(await thief.recv())[2:])
        assert stolen["sid"] != hello["sid"] and stolen["pid"] != hello["pid"]
        await thief.close()

        back = await connect_sio(
            node.port, {"token": token_for("doc:*"), "pid": hello["pid"], "offset": "0"}
        )
        recovered = json.loads(str(await back.recv())[2:])
        assert recovered["sid"] == hello["sid"]
        assert ("/", "doc:1") in node.hub.rooms


async def test_a_pid_with_braces_on_redis_is_a_fresh_session(
    redis_url: str, redis_prefix: str
) -> None:
    """A pid that would break a Redis key (braces) is refused as malformed and counted; the
    client still connects (it raised an uncaught KeyNameError before)."""
    async with running(redis_url=redis_url, redis_prefix=redis_prefix) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*"), "pid": "a{b}c"})
        hello = json.loads(str(await raw.recv())[2:])
        assert "sid" in hello and hello["pid"] != "a{b}c"
        value = node.metrics.registry.get_sample_value(
            "roomcast_recoveries_total", {"result": "bad_pid"}
        )
        assert value == 1
        await raw.send('421["join","doc:1"]')
        assert await raw.recv(timeout=10) == '431[{"ok":true}]'


async def test_a_failing_before_connect_is_an_internal_error_and_holds_nothing() -> None:
    """A before_connect hook that raises (not ConnectRefusedError) answers connect_error
    internal_error, releases a recovering socket's rooms, and the server keeps serving."""
    app = Application()

    @app.before_connect()
    async def broken(socket: Socket, auth: dict[str, object]) -> None:
        if "pid" in auth:
            raise RuntimeError("bug in the app")

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        await _drop(node, raw)
        back = await connect_sio(
            node.port, {"token": token_for("doc:*"), "pid": hello["pid"], "offset": "0"}
        )
        refused = str(await back.recv())
        assert refused.startswith("44"), refused
        assert json.loads(refused[2:])["data"]["code"] == "internal_error"
        assert node.hub._pending == {} and ("/", "doc:1") not in node.hub.rooms
        value = node.metrics.registry.get_sample_value(
            "roomcast_auth_failures_total", {"code": "internal_error"}
        )
        assert value == 1
        fresh = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await fresh.recv()).startswith("40")
