"""The Admin UI's server side (``roomcast.admin``) through the official socket.io-client, as the
UI itself uses it: the login, the session id it reuses, read-only mode, and one UI over three
instances on Redis.  The UI in chromium is tests/test_admin_ui.py."""

from __future__ import annotations

import secrets
import urllib.parse
from typing import TYPE_CHECKING, Any

import bcrypt
import multi_fixtures
import pytest
from conftest import http_json
from multi_fixtures import ClientsError, NodeClients, metric, publish_ok, redis_args

import redis_fixtures

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer, ServerFactory
    from multi_fixtures import GatewayFactory

pytestmark = pytest.mark.interop

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients

PASSWORD = secrets.token_urlsafe(12)
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
NSP = "/console"
"""Not the UI's default ``/admin``: the test app has a namespace of that name."""
ADMIN = ("--admin-username", "ops", "--admin-password-hash", HASH, "--admin-namespace", NSP)
ROOMS = ("adm:**",)
LOGIN = {"username": "ops", "password": PASSWORD}


def admin_connect(clients: NodeClients, name: str, server: RoomcastServer, auth: Any) -> str:
    """Connect ``name`` to the admin namespace with ``auth``; return its socket id."""
    connected = clients.connect(name, f"{server.url}{NSP}", "", auth=auth)
    return str(connected["id"])


def sockets_in(server: RoomcastServer, room: str) -> set[str]:
    headers = {"Authorization": f"Bearer {server.credentials.api_key}"}
    status, body = http_json(
        "GET", f"{server.url}/api/v1/sockets?room={urllib.parse.quote(room)}", None, headers
    )
    assert status == 200, body
    return {s["id"] for s in body["sockets"]}


def listed(event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sockets of an ``all_sockets`` event, by id."""
    return {s["id"]: s for s in event["args"][0]}


def test_login_session_reuse_and_refusals(
    roomcast_factory: ServerFactory, node_clients: NodeClients, mint: Mint
) -> None:
    """The right name and password connect and get a session id, which alone connects again;
    a wrong password, a wrong name or an unknown session id is refused with the UI's
    ``invalid credentials``; the socket list carries no credential."""
    server = roomcast_factory(*ADMIN)
    client_id = node_clients.connect(
        "client", f"{server.url}?token=visible-in-no-list", mint("u1", rooms=ROOMS)
    )["id"]
    for name, auth in (
        ("wrong-password", {"username": "ops", "password": PASSWORD + "x"}),
        ("wrong-name", {"username": "root", "password": PASSWORD}),
        ("no-auth", {}),
        ("unknown-session", {"sessionId": "0" * 32}),
    ):
        with pytest.raises(ClientsError, match="invalid credentials"):
            admin_connect(node_clients, name, server, auth)

    admin_connect(node_clients, "ui", server, LOGIN)
    session = node_clients.wait_event("ui", "session")["args"][0]
    assert isinstance(session, str) and len(session) >= 24
    config = node_clients.wait_event("ui", "config")["args"][0]
    assert {"JOIN", "LEAVE", "DISCONNECT", "ALL_EVENTS"} <= set(config["supportedFeatures"])
    stats = node_clients.wait_event("ui", "server_stats")["args"][0]
    assert stats["clientsCount"] >= 2 and stats["pid"] > 0
    assert {"name": "/", "socketsCount": 1} in stats["namespaces"]
    everyone = listed(node_clients.wait_event("ui", "all_sockets"))
    mine = everyone[client_id]
    assert mine["nsp"] == "/" and mine["data"]["user"] == "u1" and mine["rooms"] == []
    assert mine["handshake"]["query"]["token"] == "[redacted]"
    assert "visible-in-no-list" not in str(everyone)
    assert len(mine["clientId"]) == 12

    admin_connect(node_clients, "ui-again", server, {"sessionId": session})
    names = [e["event"] for e in node_clients.wait_events("ui-again", until="all_sockets")]
    assert "session" not in names and "config" in names
    assert metric(server, 'roomcast_admin_logins_total{result="password"}') == 1
    assert metric(server, 'roomcast_admin_logins_total{result="session"}') == 1
    assert metric(server, 'roomcast_admin_logins_total{result="refused"}') == 4


def test_no_admin_namespace_without_credentials(
    roomcast_factory: ServerFactory, node_clients: NodeClients
) -> None:
    """Without admin_username and admin_password_hash there is no admin namespace at all."""
    server = roomcast_factory("--no-auth-required")
    with pytest.raises(ClientsError, match="Invalid namespace"):
        admin_connect(node_clients, "ui", server, LOGIN)


def test_live_events_and_actions(
    roomcast_factory: ServerFactory, node_clients: NodeClients, mint: Mint
) -> None:
    """A UI sees a socket connect, its events, a join it asked for and the disconnect it asked
    for, and the socket really joined (it receives the room's publication) and was
    disconnected."""
    server = roomcast_factory(*ADMIN)
    admin_connect(node_clients, "ui", server, LOGIN)
    node_clients.wait_event("ui", "all_sockets")
    sid = node_clients.connect("client", server.url, mint("u2", rooms=ROOMS))["id"]
    connected = node_clients.wait_event("ui", "socket_connected", sid)["args"][0]
    assert connected["data"]["user"] == "u2" and connected["transport"] in ("polling", "websocket")

    assert node_clients.emit("client", "echo", {"text": "hi"}) == [{"text": "hi"}]
    received = node_clients.wait_event("ui", "event_received", sid)["args"]
    assert received[0] == "/" and received[2] == ["echo", {"text": "hi"}]

    assert node_clients.emit("ui", "join", "/", "adm:room", sid) == []
    node_clients.wait_event("ui", "room_joined", "adm:room")
    assert sockets_in(server, "adm:room") == {sid}
    publish_ok(server, "adm:room", "news", 1)
    assert node_clients.wait_events("client", until="news")[-1]["data"] == 1

    assert node_clients.emit("ui", "leave", "/", "adm:room", sid) == []
    node_clients.wait_event("ui", "room_left", "adm:room")
    assert sockets_in(server, "adm:room") == set()

    assert node_clients.emit("ui", "_disconnect", "/", False, sid) == []
    disconnected = node_clients.wait_event("ui", "socket_disconnected", sid)["args"]
    assert disconnected[:2] == ["/", sid]
    assert node_clients.wait_disconnects("client", 1) == ["io server disconnect"]
    assert metric(server, 'roomcast_admin_actions_total{action="join",result="done"}') == 1


def test_readonly_refuses_actions(
    roomcast_factory: ServerFactory, node_clients: NodeClients, mint: Mint
) -> None:
    """In read-only mode the UI is told no action is supported, and a join or disconnect it
    sends anyway changes nothing (counted as refused)."""
    server = roomcast_factory(*ADMIN, "--admin-readonly")
    sid = node_clients.connect("client", server.url, mint("u3", rooms=ROOMS))["id"]
    admin_connect(node_clients, "ui", server, LOGIN)
    config = node_clients.wait_event("ui", "config")["args"][0]
    assert config["supportedFeatures"] == ["AGGREGATED_EVENTS", "ALL_EVENTS"]
    assert sid in listed(node_clients.wait_event("ui", "all_sockets"))

    assert node_clients.emit("ui", "join", "/", "adm:ro", sid) == []
    assert node_clients.emit("ui", "_disconnect", "/", True, sid) == []
    assert sockets_in(server, "adm:ro") == set()
    assert node_clients.emit("client", "echo", "still here") == ["still here"]
    assert metric(server, 'roomcast_admin_actions_total{action="join",result="readonly"}') == 1
    assert (
        metric(server, 'roomcast_admin_actions_total{action="disconnect",result="readonly"}') == 1
    )


@pytest.mark.redis
def test_one_ui_over_three_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Connected to one instance, the UI lists the sockets of all three, gets the stats of
    each as its own server, sees a socket connect on another instance, and its join and
    disconnect reach sockets on the others; its session id works on every instance."""
    servers = gateways(3, *redis_args(redis_url, redis_prefix), *ADMIN)
    ids = [
        node_clients.connect(f"c{index}", server.url, mint(f"u{index}", rooms=ROOMS))["id"]
        for index, server in enumerate(servers)
    ]
    admin_connect(node_clients, "ui", servers[0], LOGIN)
    session = node_clients.wait_event("ui", "session")["args"][0]
    everyone = listed(node_clients.wait_event("ui", "all_sockets"))
    assert set(ids) <= set(everyone)
    instances = {everyone[sid]["data"]["instance"] for sid in ids}
    assert len(instances) == 3
    seen: set[str] = set()
    after = 0
    while seen != instances:
        found = node_clients.wait_event("ui", "server_stats", after=after)
        seen.add(found["args"][0]["serverId"])
        after = found["index"] + 1

    late = node_clients.connect("late", servers[2].url, mint("u9", rooms=ROOMS))["id"]
    node_clients.wait_event("ui", "socket_connected", late)

    assert node_clients.emit("ui", "join", "/", "adm:mi", ids[1]) == []
    node_clients.wait_event("ui", "room_joined", ids[1])
    publish_ok(servers[0], "adm:mi", "hello", "from 0")
    assert node_clients.wait_events("c1", until="hello")[-1]["data"] == "from 0"

    assert node_clients.emit("ui", "_disconnect", "/", False, late) == []
    node_clients.wait_event("ui", "socket_disconnected", late)
    assert node_clients.wait_disconnects("late", 1) == ["io server disconnect"]

    # The session made on instance 0 is known to instance 1 (the UI may reconnect anywhere).
    admin_connect(node_clients, "ui-elsewhere", servers[1], {"sessionId": session})
    elsewhere = listed(node_clients.wait_event("ui-elsewhere", "all_sockets"))
    assert set(ids) <= set(elsewhere) and late not in elsewhere
