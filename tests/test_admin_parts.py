"""The Admin UI's parts in one process (``roomcast.admin``): the login's session store, the tap
that records only while watched, the resync after a gap or a burst, what the UI may see, and
the settings and ``roomcast admin-hash``.  Clients are raw WebSockets (tests/wire.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import bcrypt
import pytest

from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast import config
from roomcast.admin.auth import MAX_WAITING, AdminAuth, LoginRefusedError, session_digest
from roomcast.admin.tap import MAX_ARGS_BYTES, MAX_BUFFER, shown
from roomcast.config import ConfigError
from roomcast.node import Node
from wire import Raw, connect_sio, running

PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
ADMIN = {"admin_username": "ops", "admin_password_hash": HASH}


def sample(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def admin(node: Node, auth: dict[str, Any] | None = None) -> Raw:
    """An admin socket, connected; its CONNECT answer read."""
    raw = await Raw.connect(node.port)
    await raw.send("40/admin," + json.dumps(auth or {"username": "ops", "password": PASSWORD}))
    answer = str(await raw.recv())
    assert answer.startswith("40/admin,"), answer
    return raw


async def next_event(raw: Raw, name: str, timeout: float = 10.0) -> list[Any]:
    """The arguments of the next event ``name`` on the admin namespace (others skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = str(await raw.recv(max(deadline - time.monotonic(), 0.01)))
        if message.startswith("42/admin,"):
            event = json.loads(message[len("42/admin,") :])
            if event[0] == name:
                return list(event[1:])


async def client(node: Node) -> tuple[Raw, str]:
    raw = await connect_sio(node.port, {"token": token_for("doc:*")})
    answer = json.loads(str(await raw.recv())[2:])
    return raw, str(answer["sid"])


# --------------------------------------------------------------------------- the login


async def test_sessions_are_bounded_and_expire() -> None:
    """A login makes a session; the store keeps the newest few, forgets expired ones, and holds
    digests rather than the ids themselves."""
    auth = AdminAuth("ops", HASH, max_sessions=2)
    made = [(await auth.login({"username": "ops", "password": PASSWORD})).session for _ in range(3)]
    assert all(isinstance(s, str) for s in made)
    assert [auth.valid(str(s)) for s in made] == [False, True, True]
    assert len(auth) == 2
    assert str(made[2]) not in auth._sessions and session_digest(str(made[2])) in auth._sessions
    assert (await auth.login({"sessionId": made[2]})).session is None
    auth.remember(session_digest("old"), time.time() - 1)  # already expired: not kept
    assert not auth.valid("old")
    auth.remember(session_digest("soon"), time.time() + 0.05)
    await eventually(lambda: not auth.valid("soon"), timeout=2, what="the session to expire")


@pytest.mark.parametrize(
    "payload",
    [
        {"username": "ops", "password": "wrong"},
        {"username": "root", "password": PASSWORD},
        {"username": "ops", "password": PASSWORD + "x" * 80},  # past bcrypt's 72 bytes
        {"username": "ops"},
        {"sessionId": "unknown"},
        {"sessionId": 5, "username": None},
    ],
)
async def test_refused_logins(payload: dict[str, Any]) -> None:
    """Anything but the name and the password (or a live session id) is refused."""
    with pytest.raises(LoginRefusedError) as refused:
        await AdminAuth("ops", HASH).login(payload)
    assert refused.value.code == "invalid_credentials"
    assert refused.value.message == "invalid credentials"


async def test_a_flood_of_logins_is_refused_without_waiting() -> None:
    """Logins beyond the queue of bcrypt checks are refused at once as ``busy``."""
    slow = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    auth = AdminAuth("ops", slow)
    attempts = [
        asyncio.ensure_future(auth.login({"username": "ops", "password": "guess"}))
        for _ in range(MAX_WAITING + 3)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    codes = [r.code for r in results if isinstance(r, LoginRefusedError)]
    assert len(codes) == len(attempts)
    assert codes.count("busy") == 3 and codes.count("invalid_credentials") == MAX_WAITING


# --------------------------------------------------------------------------- what is shown


def test_event_arguments_shown_without_binary_or_bulk() -> None:
    """Binary parts are named by their size, and arguments longer than the limit by theirs."""
    assert shown(["e", {"a": 1}]) == ["e", {"a": 1}]
    assert shown(["e", b"\x00\x01", [bytearray(3)]]) == [
        "e",
        "(binary, 2 bytes)",
        ["(binary, 3 bytes)"],
    ]
    big = shown(["e", "x" * MAX_ARGS_BYTES])
    assert big[0] == "e" and big[1].endswith("bytes)") and len(big) == 2


# --------------------------------------------------------------------------- in a node


async def test_no_recording_without_a_watcher() -> None:
    """The socket server has no observer until an Admin UI connects, and none again once its
    lease ran out after it left."""
    async with running(**ADMIN) as node:
        assert node.admin is not None
        node.admin.tap.lease_s = 0.3
        raw, _ = await client(node)
        assert node.sockets.observer is None
        ui = await admin(node)
        await next_event(ui, "all_sockets")
        assert node.sockets.observer is node.admin.tap
        await ui.ws.close()
        await eventually(lambda: node.sockets.observer is None, timeout=5, what="recording to stop")
        await raw.ws.close()


async def test_an_overflow_makes_a_gap_and_the_ui_resyncs() -> None:
    """Events beyond the tap's buffer are dropped and counted; the UI sees the gap and gets a
    fresh list, with the socket that connected meanwhile."""
    async with running(**ADMIN) as node:
        assert node.admin is not None
        node.admin.console.min_resync_s = 0.0
        first, first_id = await client(node)
        ui = await admin(node)
        await next_event(ui, "all_sockets")
        socket = node.sockets.sockets[first_id]  # type: ignore[index]
        for n in range(MAX_BUFFER + 1):
            node.admin.tap.received(socket, ["flood", n])
        late, late_id = await client(node)
        listed = await next_event(ui, "all_sockets")
        assert {first_id, late_id} <= {s["id"] for s in listed[0]}
        assert sample(node, "roomcast_admin_resyncs_total", cause="gap") == 1
        assert sample(node, "roomcast_dropped_messages_total", reason="admin_feed_overflow") == (
            MAX_BUFFER + 1
        )
        for raw in (first, late, ui):
            await raw.ws.close()


async def test_a_burst_beyond_the_budget_becomes_a_fresh_list() -> None:
    """More feed events in a second than the budget: the rest wait for a fresh list."""
    async with running(**ADMIN) as node:
        assert node.admin is not None
        node.admin.console.min_resync_s = 0.0
        node.admin.console.event_budget = 2
        raw, _ = await client(node)
        ui = await admin(node)
        await next_event(ui, "all_sockets")
        for n in range(4):
            await raw.send(f'42["note",{n}]')
        listed = await next_event(ui, "all_sockets")
        assert len(listed[0]) == 2  # the client and the UI itself
        assert sample(node, "roomcast_admin_resyncs_total", cause="burst") == 1
        await raw.ws.close()
        await ui.ws.close()


async def test_the_list_limit_keeps_the_newest_and_the_admins() -> None:
    """A fresh list holds the newest sockets up to the limit, and the UI's own socket."""
    async with running(**ADMIN, admin_socket_list_limit=2) as node:
        clients = [await client(node) for _ in range(4)]
        ui = await admin(node)
        listed = {s["id"] for s in (await next_event(ui, "all_sockets"))[0]}
        assert listed - {clients[2][1], clients[3][1]} == {
            s.id for s in node.sockets.sockets.values() if s.namespace.internal
        }
        stats = (await next_event(ui, "server_stats"))[0]
        assert {"name": "/", "socketsCount": 4} in stats["namespaces"]
        for raw, _ in clients:
            await raw.ws.close()
        await ui.ws.close()


async def test_an_admin_namespace_the_app_has_or_a_bad_one_is_refused() -> None:
    """The admin namespace may not be one of the application's, nor a bad name."""
    from roomcast.app import Application

    app = Application()
    app.namespace("/admin")
    with pytest.raises(ConfigError, match="admin_namespace '/admin' is a namespace of the app"):
        Node(config.Settings(port=1, jwt_secret="s" * 48, **ADMIN), app)
    with pytest.raises(ConfigError, match="admin_namespace: invalid namespace"):
        Node(config.Settings(port=1, jwt_secret="s" * 48, admin_namespace="/a b", **ADMIN))


# --------------------------------------------------------------------------- settings, CLI


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ROOMCAST_ADMIN_USERNAME": "ops"}, "go together"),
        ({"ROOMCAST_ADMIN_PASSWORD_HASH": HASH}, "go together"),
        (
            {"ROOMCAST_ADMIN_USERNAME": "ops", "ROOMCAST_ADMIN_PASSWORD_HASH": "secret"},
            "bcrypt hash",
        ),
        ({"ROOMCAST_ADMIN_NAMESPACE": "/"}, "other than '/'"),
        ({"ROOMCAST_ADMIN_NAMESPACE": "admin"}, "admin_namespace"),
        ({"ROOMCAST_ADMIN_SOCKET_LIST_LIMIT": "0"}, "admin_socket_list_limit"),
    ],
)
def test_admin_settings_are_checked(env: dict[str, str], message: str) -> None:
    """Bad admin settings name the key; the hash is masked when settings are shown."""
    with pytest.raises(ConfigError, match=message):
        config.load({}, env)
    shown_settings = config.load(
        {}, {"ROOMCAST_ADMIN_USERNAME": "ops", "ROOMCAST_ADMIN_PASSWORD_HASH": HASH}
    ).redacted()
    assert shown_settings["admin_password_hash"] == "***"


def test_admin_hash_cli() -> None:
    """``roomcast admin-hash`` reads the password from stdin and prints a bcrypt hash of it."""
    result = subprocess.run(
        [sys.executable, "-m", "roomcast", "admin-hash", "--rounds", "4"],
        input="s3cret pass\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    printed = result.stdout.strip()
    assert bcrypt.checkpw(b"s3cret pass", printed.encode())
    config.load({}, {"ROOMCAST_ADMIN_USERNAME": "ops", "ROOMCAST_ADMIN_PASSWORD_HASH": printed})


def test_event_arguments_shown_to_the_ui_hold_no_secret_and_never_raise() -> None:
    """A refresh event's fresh token (any key named like a credential) reaches the UI as
    [redacted]; values no JSON holds (bytes, a datetime, int keys) are shown, never raised."""
    import datetime

    from roomcast.admin.tap import shown

    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    assert shown(["refresh", {"token": token}]) == ["refresh", {"token": "[redacted]"}]
    nested = shown(["e", [{"Password": "p", "ok": 1}]])
    assert nested == ["e", [{"Password": "[redacted]", "ok": 1}]]
    odd = shown(["e", b"\x00\x01", {1: datetime.datetime(2026, 1, 1)}])
    assert odd == ["e", "(binary, 2 bytes)", {"1": "2026-01-01T00:00:00"}]
