"""The official socket.io-client (Node, tests/interop) against a real ``roomcast serve``.

Each test runs one script of ``tests/interop`` and asserts on the JSON it prints. The scripts
share one server, except the restart tests (a server each) and the heartbeat tests (a server
with a 100 ms ping interval).
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from typing import TYPE_CHECKING, Any

import jwt
import pytest

if TYPE_CHECKING:
    from conftest import Mint, NodeScripts, RoomcastServer, ServerFactory

OK = {"ok": True}


def _assert_refused(ack: dict[str, Any], code: str) -> None:
    assert ack["ok"] is False, ack
    assert ack["error"]["code"] == code, ack
    assert isinstance(ack["error"]["message"], str)
    assert ack["error"]["message"], ack


@pytest.fixture(scope="module")
def server(roomcast_server: RoomcastServer) -> RoomcastServer:
    return roomcast_server


@pytest.fixture(scope="module")
def token(mint: Mint) -> str:
    return mint("alice", rooms=("doc:*", "team:7:*"))


def _basics(node: NodeScripts, server: RoomcastServer, token: str, **extra: Any) -> dict[str, Any]:
    config = {"url": server.url, "token": token, "apiKey": server.credentials.api_key}
    return node.run("basics.mjs", {**config, "room": "doc:basics", **extra})


def _assert_basics_flow(result: dict[str, Any]) -> None:
    assert result["join"] == [OK]
    published = result["published"]
    assert published["status"] == 202
    assert set(published["body"]) == {"id", "offset", "room"}
    assert published["body"]["room"] == "doc:basics"
    data, offset = result["news"]
    assert data == {"headline": "héllo", "n": 1}
    assert offset == published["body"]["offset"]
    assert result["echo"] == [{"text": "ünïcode ✓", "list": [1, 2.5, None, True]}]


# --------------------------------------------------------------------------- transports


@pytest.mark.interop
def test_websocket_only_client(
    node_scripts: NodeScripts, server: RoomcastServer, token: str
) -> None:
    """A websocket-only client connects, joins, receives a published event and gets acks."""
    result = _basics(node_scripts, server, token, transports=["websocket"])
    assert result["transportAtOpen"] == "websocket"
    assert result["transportAfter"] == "websocket"
    assert result["upgrades"] == []
    _assert_basics_flow(result)


@pytest.mark.interop
def test_polling_only_client(node_scripts: NodeScripts, server: RoomcastServer, token: str) -> None:
    """A long-polling-only client does the same and is never upgraded."""
    result = _basics(node_scripts, server, token, transports=["polling"])
    assert result["transportAtOpen"] == "polling"
    assert result["transportAfter"] == "polling"
    assert result["upgrades"] == []
    _assert_basics_flow(result)


@pytest.mark.interop
def test_polling_upgrades_to_websocket(
    node_scripts: NodeScripts, server: RoomcastServer, token: str
) -> None:
    """A default client starts on polling, upgrades to websocket, and events still flow."""
    result = _basics(node_scripts, server, token, expectUpgrade=True)
    assert result["transportAtOpen"] == "polling"
    assert result["upgrades"] == ["websocket"]
    assert result["transportAfter"] == "websocket"
    _assert_basics_flow(result)


# --------------------------------------------------------------------------- namespaces


@pytest.mark.interop
def test_namespaces(node_scripts: NodeScripts, server: RoomcastServer, token: str) -> None:
    """Namespaces "/" and "/admin" share a connection; an unknown one gets "Invalid namespace"."""
    result = node_scripts.run("namespaces.mjs", {"url": server.url, "token": token})
    assert result["sameEngine"] is True
    ids = result["ids"]
    assert ids["main"] and ids["admin"] and ids["main"] != ids["admin"]
    assert result["adminWelcome"] == [{"user": "alice", "namespace": "/admin"}]
    assert result["unknownError"]["message"] == "Invalid namespace"
    assert result["stillConnected"] == {"main": True, "admin": True}
    assert result["mainEcho"] == ["still here"]
    # join is a built-in of every namespace.
    assert result["adminJoin"][0] == OK, result["adminJoin"]
    anonymous = result["anonymousError"]
    assert anonymous["data"]["code"] == "token_missing", anonymous


# --------------------------------------------------------------------------- rooms


@pytest.mark.interop
def test_join_and_leave(node_scripts: NodeScripts, server: RoomcastServer, mint: Mint) -> None:
    """Joins are acked ok, forbidden or invalid_room by claim and name (``*`` one segment,
    ``**`` one or more); a left room goes quiet."""
    token = mint("alice", rooms=("doc:*", "team:7:*", "org:**"))
    config = {"url": server.url, "token": token, "apiKey": server.credentials.api_key}
    result = node_scripts.run("rooms.mjs", config)
    joins = result["joins"]
    allowed = ("allowed", "allowedOneSegment", "allowedDeep", "allowedDeepOne", "longest")
    for name in (*allowed, "again", "second"):
        assert joins[name] == OK, (name, joins[name])
    forbidden = ("forbiddenDeep", "forbiddenBelowDoc", "forbiddenZeroSegments")
    for name in ("forbidden", "forbiddenSibling", *forbidden, "forbiddenEmptySegment"):
        _assert_refused(joins[name], "forbidden")
    for name in ("space", "empty", "tooLong", "notString"):
        _assert_refused(joins[name], "invalid_room")
    assert result["leave"] == OK
    _assert_refused(result["leaveInvalid"], "invalid_room")
    assert result["leaveNotJoined"] == OK
    assert [e["event"] for e in result["events"]] == ["marker"]


# --------------------------------------------------------------------------- delivery


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["websocket", "polling", "upgrading"])
def test_published_events_arrive_once_in_order(
    node_scripts: NodeScripts, server: RoomcastServer, token: str, transport: str
) -> None:
    """Twenty published events arrive exactly once, in order; a bad API key delivers nothing."""
    room = f"doc:order-{transport}"
    config: dict[str, Any] = {"url": server.url, "token": token, "room": room}
    if transport == "upgrading":  # default transports: publishing while the upgrade goes on
        config["expectUpgrade"] = True
    else:
        config["transports"] = [transport]
    run = node_scripts.start("order.mjs", config)
    assert run.wait_step("joined")["join"] == [OK]

    status, body = server.publish(room, "intruder", 1, api_key="wrong-key")
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"
    status, body = server.publish(room, "intruder", 2, api_key="")
    assert status == 401, body

    offsets = []
    for n in range(20):
        status, body = server.publish(room, "tick", {"n": n})
        assert status == 202, body
        offsets.append(body["offset"])
    assert server.publish(room, "end", None)[0] == 202

    result = run.result()
    assert result["transport"] == ("websocket" if transport == "upgrading" else transport)
    events = result["events"]
    assert [e["event"] for e in events] == ["tick"] * 20 + ["end"]
    assert [e["args"][0] for e in events[:20]] == [{"n": n} for n in range(20)]
    assert [e["args"][1] for e in events[:20]] == offsets
    assert len(set(offsets)) == 20


# --------------------------------------------------------------------------- acks and binary


def _pattern(length: int, modulo: int) -> str:
    return bytes(i % modulo for i in range(length)).hex()


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_acks_and_binary_both_ways(
    node_scripts: NodeScripts, server: RoomcastServer, token: str, transport: str
) -> None:
    """Client->server acks echo JSON and binary; the server's own call gets the client's ack."""
    config = {"url": server.url, "token": token, "transports": [transport]}
    result = node_scripts.run("acks.mjs", config)
    assert result["transport"] == transport
    assert result["json"] == ["a", 1, {"b": [True, None, 2.5]}]
    assert result["nothing"] == []

    first, second, third = result["binary"]
    assert first == {"binary": "Buffer", "hex": _pattern(256, 256)}
    assert second["nested"] == {"binary": "Buffer", "hex": b"roomcast".hex()}
    assert second["label"] == "x"
    assert second["list"] == [{"binary": "Buffer", "hex": _pattern(65536, 251)}]
    assert third == "text"

    assert result["asked"] == [[41]]
    assert result["pingAck"] == [OK]
    assert result["clientAnswered"] == [42, {"binary": "Buffer", "hex": "090807"}]


# --------------------------------------------------------------------------- reconnection


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["websocket", "polling"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_reconnects_after_server_restart(
    node_scripts: NodeScripts,
    roomcast_factory: ServerFactory,
    token: str,
    sig: signal.Signals,
    transport: str,
) -> None:
    """After the server dies and comes back on the same port, the client reconnects by itself."""
    server = roomcast_factory()
    config = {
        "url": server.url,
        "token": token,
        "apiKey": server.credentials.api_key,
        "room": "doc:restart",
        "transports": [transport],
    }
    run = node_scripts.start("reconnect.mjs", config, timeout=25.0)
    first = run.wait_step("connected")
    assert first["join"] == [OK]
    server.restart(sig)
    result = run.result()
    assert result["connects"] == 2
    # One disconnect, with a reason after which the client reconnects by itself. A killed server
    # breaks the pending poll ("transport error"); a closed websocket is a "transport close".
    # A draining server should say goodbye ("transport close"), but misses polling clients that
    # hold no poll at that moment: test_drain_says_goodbye_to_polling_clients pins that down.
    if transport == "websocket":
        expected = {"transport close"}
    elif sig is signal.SIGKILL:
        expected = {"transport error"}
    else:
        expected = {"transport close", "transport error"}
    assert len(result["disconnects"]) == 1, result["disconnects"]
    assert result["disconnects"][0] in expected, result["disconnects"]
    assert result["join2"] == [OK]
    assert result["publishStatus"] == 202
    assert result["received"] == {"after": "restart"}
    # The in-memory broker lost the session with the process: a new socket, not a recovery.
    assert result["recovered"] is False
    assert result["secondSid"] != result["firstSid"]


def test_drain_says_goodbye_to_polling_clients(roomcast_factory: ServerFactory, mint: Mint) -> None:
    """A draining server hands a polling client a PING with its next poll, and its CLOSE packet
    with the poll after the PONG (raw Engine.IO)."""
    server = roomcast_factory("--drain-seconds", "3")
    path = "/socket.io/?EIO=4&transport=polling"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)

    def request(method: str, url: str, body: str | None = None) -> tuple[int, str]:
        connection.request(method, url, body=body)
        response = connection.getresponse()
        return response.status, response.read().decode()

    try:
        status, body = request("GET", path)
        assert status == 200, body
        sid = json.loads(body[1:])["sid"]
        session = f"{path}&sid={sid}"
        connect = "40" + json.dumps({"token": mint()})
        assert request("POST", session, connect) == (200, "ok")
        status, body = request("GET", session)
        assert (status, body[:2]) == (200, "40"), body
        # No poll is held now, as between two polls of a real client. Drain, and poll again on
        # the same keep-alive connection once the server says it drains.
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while "draining" not in server.stderr():
            assert time.monotonic() < deadline, "the server never said it was draining"
            time.sleep(0.01)
        try:
            answer = request("GET", session)
        except (ConnectionError, http.client.HTTPException) as error:
            pytest.fail(f"the poll after SIGTERM got no answer: {error!r}")
        status, body = answer
        assert (status, body) == (200, "2"), body  # told to leave: a PING first
        assert request("POST", session, "3") == (200, "ok")
        status, body = request("GET", session)
        assert (status, body) == (200, "1"), body  # the CLOSE, alone, once the PONG came
    finally:
        connection.close()


@pytest.mark.interop
@pytest.mark.parametrize(
    "transport",
    [
        "websocket",
        "polling",
    ],
)
def test_connection_state_recovery(
    node_scripts: NodeScripts, server: RoomcastServer, token: str, transport: str
) -> None:
    """A client whose transport drops gets back its socket id, its rooms and the missed events."""
    config = {
        "url": server.url,
        "token": token,
        "apiKey": server.credentials.api_key,
        "room": f"doc:recover-{transport}",
        "transports": [transport],
    }
    result = node_scripts.run("recover.mjs", config)
    assert result["join"] == OK
    assert result["reason"] == "forced close"
    assert result["recovered"] is True
    assert result["secondSid"] == result["firstSid"]
    assert result["gotAfter"] is True
    offsets = result["offsets"]
    assert result["events"] == [
        {"event": "before", "args": [0, offsets[0]]},
        {"event": "missed", "args": [1, offsets[1]]},
        {"event": "missed", "args": [2, offsets[2]]},
        {"event": "after", "args": [3, offsets[3]]},
    ]


@pytest.fixture(scope="module")
def fast_heartbeat_server(module_roomcast_factory: ServerFactory) -> RoomcastServer:
    """A server that pings every 100 ms and waits 200 ms for the pong."""
    return module_roomcast_factory("--ping-interval-ms", "100", "--ping-timeout-ms", "200")


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_heartbeat_keeps_idle_clients(
    node_scripts: NodeScripts, fast_heartbeat_server: RoomcastServer, token: str, transport: str
) -> None:
    """An idle client answers five server pings and stays on the same, working connection."""
    config = {
        "url": fast_heartbeat_server.url,
        "token": token,
        "pings": 5,
        "transports": [transport],
    }
    result = node_scripts.run("heartbeat.mjs", config)
    assert result["transport"] == transport
    assert result["engineIdUnchanged"] is True
    assert result["connected"] is True
    assert result["disconnects"] == []
    assert result["echo"] == ["alive"]


# --------------------------------------------------------------------------- authentication


_OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"

_AUTH_CASES: dict[str, tuple[str, str, list[str] | None, str | None]] = {
    # name: (how the token is passed, which token, transports, expected error code or None)
    "no_token": ("none", "", None, "token_missing"),
    "empty_token": ("auth", "", None, "token_missing"),
    "garbage_token": ("auth", "garbage", None, "token_invalid"),
    "wrong_signature": ("auth", "other-secret", None, "token_invalid"),
    "expired_token": ("auth", "expired", None, "token_expired"),
    "expired_in_query": ("query", "expired", ["websocket"], "token_expired"),
    "auth_payload": ("auth", "valid", None, None),
    "query_polling": ("query", "valid", ["polling"], None),
    "query_websocket": ("query", "valid", ["websocket"], None),
    "header_polling": ("header", "valid", ["polling"], None),
    "header_websocket": ("header", "valid", ["websocket"], None),
}


@pytest.fixture(scope="module")
def auth_outcomes(
    node_scripts: NodeScripts, server: RoomcastServer, token: str, expired_token: str
) -> dict[str, Any]:
    """Run every case of ``_AUTH_CASES`` in one Node process; the outcome of each by name."""
    tokens = {
        "": "",
        "garbage": "not.a-jwt",
        "other-secret": jwt.encode({"sub": "mallory"}, _OTHER_SECRET, algorithm="HS256"),
        "expired": expired_token,
        "valid": token,
    }
    cases = [
        {"name": name, "via": via, "token": tokens[which], "transports": transports}
        for name, (via, which, transports, _code) in _AUTH_CASES.items()
    ]
    return node_scripts.run("auth.mjs", {"url": server.url, "cases": cases})


@pytest.mark.interop
@pytest.mark.parametrize("name", [n for n, case in _AUTH_CASES.items() if case[3] is not None])
def test_auth_failure_codes(auth_outcomes: dict[str, Any], name: str) -> None:
    """A refused connection gets connect_error with human text and exactly the expected code."""
    outcome = auth_outcomes[name]
    assert outcome["connected"] is False, outcome
    assert outcome["data"]["code"] == _AUTH_CASES[name][3], outcome
    assert isinstance(outcome["message"], str)
    assert outcome["message"], outcome


@pytest.mark.interop
@pytest.mark.parametrize("name", [n for n, case in _AUTH_CASES.items() if case[3] is None])
def test_token_carriers(auth_outcomes: dict[str, Any], name: str) -> None:
    """A token in the auth payload, the query or an Authorization header connects and joins."""
    outcome = auth_outcomes[name]
    assert outcome["connected"] is True, outcome
    transports = _AUTH_CASES[name][2]
    if transports is not None:
        assert outcome["transport"] == transports[0]
    assert outcome["join"] == OK


# --------------------------------------------------------------------------- client publish


@pytest.mark.interop
def test_client_publish(node_scripts: NodeScripts, server: RoomcastServer, mint: Mint) -> None:
    """A publish claim lets a client reach the other members; without it the ack is forbidden."""
    config = {
        "url": server.url,
        "apiKey": server.credentials.api_key,
        "publisher": mint("alice", rooms=("doc:*", "team:7:*"), publish=("doc:*",)),
        "reader": mint("bob", rooms=("doc:*", "team:7:*")),
        "room": "doc:chat",
        "otherRoom": "team:7:chat",
    }
    result = node_scripts.run("client_publish.mjs", config)
    assert result["joins"] == [OK, OK, OK]
    allowed = result["allowed"]
    assert allowed["ok"] is True, allowed
    assert isinstance(allowed["id"], str)
    assert allowed["id"]
    _assert_refused(result["forbidden"], "forbidden")
    _assert_refused(result["otherRoom"], "forbidden")
    _assert_refused(result["malformed"], "invalid_publish")
    assert result["events"]["bob"] == [
        {"event": "note", "data": {"text": "hi"}},
        {"event": "end", "data": None},
    ]
    assert result["events"]["alice"] == [{"event": "end", "data": None}]
