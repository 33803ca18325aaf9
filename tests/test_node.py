"""Node lifecycle: graceful drain, recovery on the same node, dependency direction."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast.sessions import session_key
from wire import Raw, connect_sio, publish, running


async def drop_and_save_session(node: Any, raw: Raw) -> None:
    """Drop the client's connection as a network failure would, and wait until the server
    noticed and wrote the socket's recovery state."""
    raw.ws.transport.abort()
    await eventually(
        lambda: not node.sockets.sockets, what="the server to notice the dropped connection"
    )
    await node.sockets.session_writer.flush()


SRC = Path(__file__).resolve().parents[1] / "src" / "roomcast"


async def test_drain_closes_clients_and_keeps_their_recovery_state() -> None:
    """Draining refuses new sessions, closes clients, and saves their recovery state first."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        answer = json.loads(str(await raw.recv())[2:])
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        await node.drain()
        assert node.readiness()[0] is False
        assert await raw.closed()
        state = await node.broker.take_session(session_key(answer["pid"], "alice"))
        assert state is not None and json.loads(state)["rooms"] == ["doc:1"]


async def test_recovery_on_the_same_node() -> None:
    """A client that comes back with its pid and last offset gets its id, rooms and missed events."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        await publish(node.port, {"room": "doc:1", "event": "e", "data": 0})
        first = json.loads(str(await raw.recv())[2:])
        offset = first[-1]
        raw.ws.transport.abort()  # a dropped transport, not a clean disconnect
        await eventually(
            lambda: not node.sockets.sockets, what="the server to notice the dropped connection"
        )
        for i in range(1, 4):
            await publish(node.port, {"room": "doc:1", "event": "e", "data": i})
        await node.sockets.session_writer.flush()
        back = await Raw.connect(node.port)
        await back.send(
            "40" + json.dumps({"token": token_for("doc:*"), "pid": hello["pid"], "offset": offset})
        )
        again = json.loads(str(await back.recv())[2:])
        assert again == {"sid": hello["sid"], "pid": hello["pid"]}
        missed = [json.loads(str(await back.recv())[2:])[1] for _ in range(3)]
        assert missed == [1, 2, 3]
        await publish(node.port, {"room": "doc:1", "event": "e", "data": 4})
        assert json.loads(str(await back.recv())[2:])[1] == 4


async def test_recovery_refused_for_another_user() -> None:
    """A pid presented with another user's token does not recover that session."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*", user="alice")})
        hello = json.loads(str(await raw.recv())[2:])
        await drop_and_save_session(node, raw)
        back = await Raw.connect(node.port)
        await back.send(
            "40"
            + json.dumps(
                {"token": token_for("doc:*", user="mallory"), "pid": hello["pid"], "offset": "0"}
            )
        )
        again = json.loads(str(await back.recv())[2:])
        assert again["sid"] != hello["sid"] and again["pid"] != hello["pid"]


def test_dependencies_point_one_way() -> None:
    """protocol imports nothing of ours; broker (which may use protocol and auth), auth (which
    may use the room patterns), metrics and config never import hub or node; patterns and
    schemas import nothing of ours."""
    rules = {
        "protocol": {"roomcast.protocol"},
        "broker": {"roomcast.broker", "roomcast.auth", "roomcast.protocol"},
        "auth.py": {"roomcast.patterns"},
        "patterns.py": set(),
        "schemas.py": set(),
        "metrics.py": set(),
        "config.py": set(),
    }
    for target, allowed in rules.items():
        files = list((SRC / target).rglob("*.py")) if (SRC / target).is_dir() else [SRC / target]
        for file in files:
            for node in ast.walk(ast.parse(file.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    if name.startswith("roomcast"):
                        assert any(name.startswith(a) for a in allowed), (
                            f"{file.name} imports {name}"
                        )


async def test_broker_counters_are_exported() -> None:
    """The broker's own drop counters appear on /metrics."""
    async with running() as node:
        node.broker.dropped["delivery_failed"] += 2  # type: ignore[attr-defined]
        text = (await _get(f"http://127.0.0.1:{node.port}/metrics")).decode()
        assert 'roomcast_broker_dropped_entries_total{reason="delivery_failed"} 2.0' in text


async def test_readiness_and_broker_state_are_gauges() -> None:
    """roomcast_ready follows /readyz, roomcast_broker_up and roomcast_broker_state the broker,
    read at scrape time."""
    async with running() as node:
        text = (await _get(f"http://127.0.0.1:{node.port}/metrics")).decode()
        assert "roomcast_ready 1.0" in text and "roomcast_broker_up 1.0" in text
        assert 'roomcast_broker_state{state="connected"} 1.0' in text
        node.draining = True
        await node.broker.stop()
        text = (await _get(f"http://127.0.0.1:{node.port}/metrics")).decode()
        assert "roomcast_ready 0.0" in text and "roomcast_broker_up 0.0" in text
        assert 'roomcast_broker_state{state="stopped"} 1.0' in text
        assert 'roomcast_broker_state{state="connected"} 0.0' in text


async def _get(url: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.read()


async def test_unreadable_recovery_state_gives_a_fresh_session() -> None:
    """A corrupt recovery state is counted and the client connects as a new session."""
    async with running() as node:
        await node.broker.save_session(session_key("pid-corrupt", "alice"), b"{not json", 60_000)
        raw = await Raw.connect(node.port)
        await raw.send(
            "40" + json.dumps({"token": token_for("doc:*"), "pid": "pid-corrupt", "offset": "0"})
        )
        answer = json.loads(str(await raw.recv())[2:])
        assert answer["pid"] != "pid-corrupt"
        value = node.metrics.registry.get_sample_value(
            "roomcast_recoveries_total", {"result": "bad_state"}
        )
        assert value == 1


async def test_a_recovered_socket_that_leaves_before_a_broadcast_frees_its_rooms() -> None:
    """Recovered past every broadcast this node made, a socket waits in the hub for the next
    one; if it goes first, the room is released (no subscription is kept for no one)."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        await drop_and_save_session(node, raw)
        _, body = await publish(node.port, {"room": "doc:1", "event": "e", "data": 1})
        back = await Raw.connect(node.port)
        await back.send(
            "40" + json.dumps({"token": token_for("doc:*"), "pid": hello["pid"], "offset": "0"})
        )
        assert json.loads(str(await back.recv())[2:])["pid"] == hello["pid"]
        assert json.loads(str(await back.recv())[2:]) == ["e", 1, body["offset"]]
        assert ("/", "doc:1") in node.hub._pending  # held until a live broadcast passes it
        await back.close()
        await eventually(
            lambda: not node.sockets.sockets, what="the server to notice the dropped connection"
        )
        assert node.hub._pending == {} and ("/", "doc:1") not in node.hub.rooms
        assert not node.subscriptions.is_active("doc:1")
        assert node.metrics.rooms._value.get() == 0


async def test_refused_recovery_releases_its_rooms() -> None:
    """A recovering socket refused by a before_connect handler leaves nothing held in the hub."""
    from roomcast import Application, ConnectRefusedError, Socket

    app = Application()

    @app.before_connect()
    async def refuse_returning(socket: Socket, auth: dict[str, object]) -> None:
        if "pid" in auth:
            raise ConnectRefusedError("no comebacks today")

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        hello = json.loads(str(await raw.recv())[2:])
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        await drop_and_save_session(node, raw)
        back = await Raw.connect(node.port)
        await back.send(
            "40" + json.dumps({"token": token_for("doc:*"), "pid": hello["pid"], "offset": "0"})
        )
        refused = json.loads(str(await back.recv())[2:])
        assert refused["message"] == "no comebacks today"
        assert node.hub._pending == {} and ("/", "doc:1") not in node.hub.rooms


async def test_failed_handler_task_is_counted() -> None:
    """A connect handler that raises is logged and counted by kind."""
    from roomcast import Application, Socket

    app = Application()

    @app.on_connect()
    async def broken(socket: Socket) -> None:
        raise RuntimeError("boom")

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert (await raw.recv()).startswith("40")
        failures = node.metrics.registry.get_sample_value
        await eventually(
            lambda: failures("roomcast_task_failures_total", {"kind": "connect"}) is not None,
            what="the failed connect handler to be counted",
        )
        assert failures("roomcast_task_failures_total", {"kind": "connect"}) == 1
