"""The server API's edges, in one process with raw clients: a session recovered on a new
connection while its old one lives, binary acks, bounded timeouts, selectors that combine,
socket ids that are not rooms, schemas on the Python emit, instances that answer an error."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from conftest_helpers import token_for
from roomcast.app import Application
from roomcast.operator import Selector
from roomcast.schemas import InvalidPayloadError
from wire import Raw, connect_sio, running


async def _connect(port: int, auth: dict[str, Any]) -> tuple[Raw, dict[str, Any]]:
    raw = await connect_sio(port, auth)
    answer = str(await raw.recv())
    assert answer.startswith("40{"), answer
    return raw, json.loads(answer[2:])


async def _join(raw: Raw, room: str, ack: int = 1) -> None:
    await raw.send(f'42{ack}["join","{room}"]')
    assert await raw.recv() == f'43{ack}[{{"ok":true}}]'


async def test_a_session_recovered_while_its_old_socket_lives_takes_it_over() -> None:
    """A client that reconnects before its old transport timed out gets its socket back; the
    old socket ends, and the server API and revocation see the new one."""
    app = Application()
    async with running(app) as node:
        token = token_for("dup:*", user="mallory")
        old, first = await _connect(node.port, {"token": token})
        await _join(old, "dup:1")
        new, second = await _connect(node.port, {"token": token, "pid": first["pid"]})
        assert second["sid"] == first["sid"]
        assert await old.recv() == "41"  # the old socket was told it ended
        found = await app.of("/").user("mallory").fetch_sockets()
        assert [(s.id, s.rooms) for s in found] == [(first["sid"], ["dup:1"])]
        reach = await node.cluster.revoke(user="mallory")
        assert reach.sockets == 1
        notice = str(await new.recv())
        assert notice.startswith('42["roomcast:disconnect"') and "token_revoked" in notice
        assert node.metrics.recoveries.labels("superseded")._value.get() == 1


async def test_acks_may_be_binary_and_timeouts_are_bounded() -> None:
    """A client that acks with bytes is answered like any other; a timeout that is not a
    number of seconds up to a minute is refused before anything is sent."""
    app = Application()
    async with running(app) as node:
        raw, hello = await _connect(node.port, {"token": token_for("bin:*")})
        await _join(raw, "bin:1")
        operator = app.to("bin:1").timeout(2)
        ask = node.tasks.spawn(operator.emit_with_ack("q", 1), name="ask")
        question = str(await raw.recv())
        assert question.startswith('421["q",1]') or question.startswith("421["), question
        ack_id = question[2 : question.index("[")]
        await raw.send(f'461-{ack_id}[{{"_placeholder":true,"num":0}}]')
        await raw.send(b"\x00\x01\xff")
        result = await ask
        assert result.acks == [(hello["sid"], b"\x00\x01\xff")] and result.missing == []
        for bad in (0, -1, 61, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="timeout"):
                app.to("bin:1").timeout(bad)
        started = time.monotonic()
        results, missing = await node.cluster.request(
            "emit_ack", Selector(), {"event": "q", "args": [], "timeout_s": "inf"}, 30.0
        )
        # The instance answered that it could not: reported at once, not after 30 s.
        assert (results, missing) == ([], [node.cluster.instance])
        assert time.monotonic() - started < 5


async def test_selectors_combine_and_socket_ids_are_not_rooms() -> None:
    """socket and room together must both hold; .to(sid) names a room, never a socket."""
    app = Application()
    async with running(app) as node:
        raw, hello = await _connect(node.port, {"token": token_for("sel:*")})
        await _join(raw, "sel:a")
        sid = hello["sid"]
        assert (await app.of("/").socket(sid).to("sel:b").disconnect_sockets()).sockets == 0
        assert (await app.to(sid).emit("direct", 1, 2)).sockets == 0  # type: ignore[union-attr]
        assert (await app.of("/").socket(sid).emit("direct", 1, 2)).sockets == 1  # type: ignore[union-attr]
        assert str(await raw.recv()) == '42["direct",1,2]'
        assert (await app.of("/").socket(sid).to("sel:a").count()).sockets == 1


async def test_the_python_emit_checks_event_schemas(tmp_path: Any) -> None:
    """A publication made with app.to(room).emit() meets the event's schema, like any other."""
    schemas = tmp_path / "schemas.json"
    schemas.write_text(json.dumps({"checked": {"type": "object", "required": ["n"]}}))
    app = Application()
    async with running(app, event_schemas=str(schemas)):
        with pytest.raises(InvalidPayloadError):
            await app.to("any:1").emit("checked", {"m": 1})
        await app.to("any:1").emit("checked", {"n": 1})
