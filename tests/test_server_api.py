"""The server-side API (``app.of(nsp).to(room)...`` and its HTTP form) across three instances on
one Redis, with rooms in every namespace, driven by the official socket.io-client."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from typing import TYPE_CHECKING, Any

import multi_fixtures
import pytest
from conftest import http_json
from multi_fixtures import NodeClients, publish_ok, redis_args

import redis_fixtures

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer
    from multi_fixtures import GatewayFactory

pytestmark = [pytest.mark.redis, pytest.mark.interop]

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients

ROOMS = ("mi:**",)
APP = ("--app", "app_for_tests:app")


def api(server: RoomcastServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {server.credentials.api_key}"}
    return http_json(method, f"{server.url}{path}", body, headers, timeout=10.0)


def ok(server: RoomcastServer, method: str, path: str, body: Any = None) -> dict[str, Any]:
    status, answer = api(server, method, path, body)
    assert status == 200, (method, path, status, answer)
    result: dict[str, Any] = answer
    return result


def events_named(clients: NodeClients, name: str, event: str) -> list[Any]:
    return [e["data"] for e in clients.state(name)["events"] if e["event"] == event]


def test_http_server_api_across_three_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Listing, counting, joining, leaving, emitting with acks and disconnecting reach the
    sockets of every instance, namespace by namespace, and name an instance that is down."""
    servers = gateways(3, *redis_args(redis_url, redis_prefix), *APP)
    room = "mi:ops:a"
    users = {"c0": "u0", "c1": "u1", "c2": "u1", "c3": "u3", "c4": "u4", "d0": "u0"}
    ids: dict[str, str] = {}
    for index, (name, user) in enumerate(users.items()):
        url = servers[index % 3].url + ("/docs" if name.startswith("d") else "")
        ids[name] = node_clients.connect(name, url, mint(user, rooms=ROOMS))["id"]
        if name != "c4":
            node_clients.join(name, room)  # c0-c3 in "/", d0 in "/docs": two different rooms

    listed = ok(servers[0], "GET", f"/api/v1/sockets?room={room}")
    assert listed["missing_instances"] == []
    found = {s["id"]: s for s in listed["sockets"]}
    assert set(found) == {ids[n] for n in ("c0", "c1", "c2", "c3")}
    assert len({s["instance"] for s in found.values()}) == 3  # c0-c3 on all three instances
    sample = found[ids["c1"]]
    assert sample["user"] == "u1" and sample["rooms"] == [room] and sample["namespace"] == "/"
    assert sample["transport"] in ("websocket", "polling") and sample["connected_at"] > 0
    in_docs = ok(servers[1], "GET", f"/api/v1/sockets?room={room}&namespace=/docs")["sockets"]
    assert [s["id"] for s in in_docs] == [ids["d0"]]
    by_user = ok(servers[2], "GET", "/api/v1/sockets?user=u1")["sockets"]
    assert {s["id"] for s in by_user} == {ids["c1"], ids["c2"]}

    counted = ok(servers[1], "GET", f"/api/v1/rooms/{urllib.parse.quote(room)}")
    assert (counted["sockets"], counted["users"]) == (4, 3), counted

    # Join and leave by user: both of u1's sockets, on two instances.
    joined = ok(servers[0], "POST", "/api/v1/sockets/join", {"user": "u1", "rooms": ["mi:ops:b"]})
    assert joined == {"sockets": 2, "missing_instances": []}
    publish_ok(servers[2], "mi:ops:b", "to-b", 1)
    for name in ("c1", "c2"):
        assert node_clients.wait_events(name, until="to-b")[-1]["data"] == 1
    left = ok(
        servers[0], "POST", "/api/v1/sockets/leave", {"socket": ids["c2"], "rooms": ["mi:ops:b"]}
    )
    assert left["sockets"] == 1
    publish_ok(servers[2], "mi:ops:b", "to-b", 2)
    publish_ok(servers[2], room, "marker", 0)
    node_clients.wait_events("c1", until="marker")
    node_clients.wait_events("c2", until="marker")
    assert events_named(node_clients, "c1", "to-b") == [1, 2]
    assert events_named(node_clients, "c2", "to-b") == [1]

    # Namespaces have their own rooms: a publication to /docs' room reaches d0 alone.
    status, body = api(
        servers[0],
        "POST",
        "/api/v1/publish",
        {"room": room, "namespace": "/docs", "event": "docs-only", "data": "d"},
    )
    assert status == 202 and body["namespace"] == "/docs", body
    assert node_clients.wait_events("d0", until="docs-only")[-1]["data"] == "d"
    publish_ok(servers[0], room, "marker", 1)
    for name in ("c0", "c1", "c2", "c3"):
        node_clients.wait_events(name, until="marker")
        assert events_named(node_clients, name, "docs-only") == [], name
    status, body = api(
        servers[0],
        "POST",
        "/api/v1/publish",
        {"room": room, "namespace": "/nowhere", "event": "e", "data": 1},
    )
    assert status == 400 and body["error"]["code"] == "unknown_namespace", body

    # Emit with acks: three members answer, one stays silent.
    for name in ("c0", "c1", "c2"):
        node_clients.answer(name, "question", {"yes": name})
    asked = ok(
        servers[2],
        "POST",
        "/api/v1/emit",
        {"room": room, "event": "question", "data": {"q": 1}, "timeout_ms": 1500},
    )
    assert sorted((a["socket"], a["response"]["yes"]) for a in asked["acks"]) == sorted(
        (ids[n], n) for n in ("c0", "c1", "c2")
    )
    assert asked["missing"] == [ids["c3"]] and asked["missing_instances"] == []
    assert events_named(node_clients, "c3", "question") == [{"q": 1}]

    # Disconnect one socket with a reason it sees.
    gone = ok(
        servers[1], "POST", "/api/v1/sockets/disconnect", {"socket": ids["c3"], "reason": "bye"}
    )
    assert gone["sockets"] == 1
    assert node_clients.wait_disconnects("c3", 1) == ["io server disconnect"]
    notices = events_named(node_clients, "c3", "roomcast:disconnect")
    assert notices == [{"code": "server_disconnect", "message": "bye"}]

    # An instance that is down is named, and the others still answer.
    down = servers[0]
    down_id = found[ids["c0"]]["instance"]
    down.kill()
    listed = ok(servers[1], "GET", f"/api/v1/sockets?room={room}")
    assert listed["missing_instances"] == [down_id]
    assert {s["id"] for s in listed["sockets"]} == {ids["c1"], ids["c2"]}

    for path, body in [
        ("/api/v1/sockets/join", {"rooms": ["mi:x"]}),
        ("/api/v1/sockets/join", {"user": "u1", "rooms": ["bad room"]}),
        ("/api/v1/emit", {"room": room, "event": "connect", "data": 1}),
    ]:
        status, answer = api(servers[1], "POST", path, body)
        assert status == 400, (path, status, answer)
    status, answer = http_json("GET", f"{servers[1].url}/api/v1/sockets?room={room}")
    assert status == 401, answer


def test_python_operator_from_handlers_and_startup_tasks(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Handlers and the app's own startup task reach a room on every instance through
    ``app.of(nsp).to(room)``, in each namespace separately, and gather acks across instances."""
    servers = gateways(2, *redis_args(redis_url, redis_prefix), *APP)
    room = "mi:py:a"
    for index, name in enumerate(("a", "b", "c")):
        node_clients.connect(name, servers[index % 2].url + "/docs", mint(f"u{index}", rooms=ROOMS))
        node_clients.join(name, room)
    node_clients.connect("main", servers[1].url, mint("u9", rooms=ROOMS))
    node_clients.join("main", room)

    assert node_clients.emit("a", "shout", room, "hello") == [{"ok": True}]
    for name in ("a", "b", "c"):
        shouted = node_clients.wait_events(name, until="shouted")[-1]
        assert shouted["data"]["text"] == "hello"
        assert shouted["offset"] is not None  # a publication: recoverable
    node_clients.answer("b", "question", "yes from b")
    (answer,) = node_clients.emit("a", "ask-room", room, 1.0, timeout=10)
    b_id, c_id = node_clients.state("b")["id"], node_clients.state("c")["id"]
    assert answer == {"acks": [[b_id, "yes from b"]], "missing": [c_id], "missing_instances": []}

    assert node_clients.emit("main", "start-beat", room) == [{"ok": True}]
    beats = node_clients.wait_events("main", 3, until="beat", timeout=10)
    assert [e["data"]["n"] for e in beats if e["event"] == "beat"][:2] == [0, 1]
    # The main namespace's room is another room: nothing of /docs reached "main", and no beat
    # reached /docs.
    assert events_named(node_clients, "main", "shouted") == []
    assert events_named(node_clients, "a", "beat") == []


def test_plain_xadd_from_redis_cli(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """``XADD <stream> * room r event e data '{}'`` from redis-cli, as a service in another
    language writes it, is delivered with the entry id as offset, in either namespace."""
    (server,) = gateways(1, *redis_args(redis_url, redis_prefix), *APP)
    node_clients.connect("main", server.url, mint("u1", rooms=ROOMS))
    node_clients.connect("docs", server.url + "/docs", mint("u2", rooms=ROOMS))
    for name in ("main", "docs"):
        node_clients.join(name, "mi:cli")
    parsed = urllib.parse.urlparse(redis_url)
    cli = ["redis-cli", "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port)]

    def xadd(key: str, *fields: str) -> str:
        done = subprocess.run(
            [*cli, "XADD", key, "*", *fields], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    main_id = xadd(
        f"{redis_prefix}:room:{{mi:cli}}",
        "room",
        "mi:cli",
        "event",
        "plain",
        "data",
        json.dumps({"a": 1}),
    )
    docs_id = xadd(
        f"{redis_prefix}:room:{{/docs#mi:cli}}",
        "room",
        "mi:cli",
        "namespace",
        "/docs",
        "event",
        "plain",
        "data",
        "[1,2]",
    )
    got = node_clients.wait_events("main", until="plain")[-1]
    assert (got["data"], got["offset"]) == ({"a": 1}, main_id)
    got = node_clients.wait_events("docs", until="plain")[-1]
    assert (got["data"], got["offset"]) == ([1, 2], docs_id)
    assert len(events_named(node_clients, "main", "plain")) == 1
