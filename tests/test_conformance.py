"""Wire-level conformance, written from the Engine.IO v4 and Socket.IO v5 specs, including what
the official suites miss because their client never answers pings."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any

import aiohttp
import pytest
import websockets

from roomcast import Application, Socket
from roomcast.app import HandlerSignatureError
from roomcast.auth import Authenticator, AuthSettings
from wire import SECRET, Raw, connect_sio, publish, running

AUTH = Authenticator(AuthSettings(secret=SECRET))


def token(rooms: tuple[str, ...] = ("doc:*",), ttl: int | None = 600, **extra: Any) -> str:
    return AUTH.mint("alice", list(rooms), ["doc:*"], ttl_seconds=ttl, extra=extra or None)


async def http(method: str, url: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as r:
        return r.status, await r.text(), r.headers


async def polling_session(port: int) -> tuple[str, str]:
    """Open a polling session and connect the main namespace; return its base URL and sid."""
    base = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
    _, body, _ = await http("GET", base)
    sid = json.loads(body[1:])["sid"]
    await http("POST", f"{base}&sid={sid}", data="40" + json.dumps({"token": token()}))
    return base, sid


def counter(node: Any, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


# -- Engine.IO handshake and requests ----------------------------------------------------------------
async def test_polling_handshake_fields() -> None:
    """A polling handshake answers the open packet with sid, upgrades, ping settings, maxPayload."""
    async with running() as node:
        status, body, _ = await http(
            "GET", f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        )
        assert status == 200 and body.startswith("0")
        value = json.loads(body[1:])
        assert set(value) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
        assert value["upgrades"] == ["websocket"] and value["maxPayload"] == 1_000_000


@pytest.mark.parametrize(
    ("query", "method", "code"),
    [
        ("EIO=3&transport=polling", "GET", 5),
        ("transport=polling", "GET", 3),
        ("EIO=abc&transport=polling", "GET", 3),
        ("EIO=4", "GET", 0),
        ("EIO=4&transport=abc", "GET", 0),
        ("EIO=4&transport=polling", "POST", 2),
        ("EIO=4&transport=polling&sid=nope", "GET", 1),
    ],
)
async def test_bad_requests(query: str, method: str, code: int) -> None:
    """Bad handshakes answer 400 with the Engine.IO error code; EIO=3 is refused."""
    async with running() as node:
        status, body, _ = await http(method, f"http://127.0.0.1:{node.port}/socket.io/?{query}")
        assert status == 400
        assert json.loads(body)["code"] == code


async def test_polling_session_roundtrip_and_close_on_invalid_packet() -> None:
    """Socket.IO connects over polling; an invalid packet answers 400 and ends the session."""
    async with running() as node:
        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        _, body, _ = await http("GET", base)
        sid = json.loads(body[1:])["sid"]
        url = f"{base}&sid={sid}"
        status, text, _ = await http("POST", url, data="40" + json.dumps({"token": token()}))
        assert (status, text) == (200, "ok")
        status, text, _ = await http("GET", url)
        assert status == 200 and text.startswith('40{"sid":')
        status, _, _ = await http("POST", url, data="abc")
        assert status == 400
        status, _, _ = await http("GET", url)
        assert status == 400
        assert (
            counter(node, "roomcast_protocol_errors_total", reason="invalid_engineio_packet") == 1
        )


async def test_oversized_polling_body_is_refused() -> None:
    """A POST body over maxPayload answers 413 and closes the session; others are unaffected."""
    async with running(max_payload=1000) as node:
        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        other = await connect_sio(node.port, {"token": token()})
        assert (await other.recv()).startswith("40")
        _, body, _ = await http("GET", base)
        url = f"{base}&sid={json.loads(body[1:])['sid']}"
        status, _, _ = await http("POST", url, data="4" + "x" * 2000)
        assert status == 413
        assert (await http("GET", url))[0] == 400
        await other.send('420["join","doc:1"]')
        assert await other.recv() == '430[{"ok":true}]'


async def test_non_utf8_polling_body() -> None:
    """A non-UTF-8 polling body is refused with 400."""
    async with running() as node:
        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        _, body, _ = await http("GET", base)
        url = f"{base}&sid={json.loads(body[1:])['sid']}"
        status, text, _ = await http("POST", url, data=b"4\xff\xfe")
        assert status == 400 and "utf-8" in text


async def test_upgrade_from_polling() -> None:
    """The probe upgrade moves a polling session to WebSocket; queued packets follow it."""
    async with running() as node:
        base, sid = await polling_session(node.port)
        ws = await websockets.connect(
            f"ws://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=websocket&sid={sid}"
        )
        await ws.send("2probe")
        assert await ws.recv() == "3probe"
        await ws.send("5")
        assert str(await ws.recv()).startswith('40{"sid":')  # queued CONNECT answer
        await ws.send('421["join","doc:9"]')
        assert await ws.recv() == '431[{"ok":true}]'
        assert (await http("GET", f"{base}&sid={sid}"))[0] == 400
        await ws.close()


async def test_ping_timeout_closes_websocket() -> None:
    """A client that never answers pings is closed after pingInterval + pingTimeout."""
    async with running(ping_interval_ms=100, ping_timeout_ms=100) as node:
        raw = await Raw.connect(node.port, pong=False)
        assert await raw.recv() == "2"
        assert await raw.closed(2.0)


async def test_cors_allow_list() -> None:
    """Polling from an origin outside the allow-list is refused; an allowed one gets CORS headers."""
    async with running(allowed_origins=("https://app.example",)) as node:
        url = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        status, _, _ = await http("GET", url, headers={"Origin": "https://evil.example"})
        assert status == 403
        status, _, headers = await http("GET", url, headers={"Origin": "https://app.example"})
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == "https://app.example"
        status, _, headers = await http(
            "OPTIONS",
            url,
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert status == 204 and headers["Access-Control-Allow-Headers"] == "authorization"
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(
                f"ws://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=websocket",
                origin=websockets.Origin("https://evil.example"),
            )


# -- Socket.IO: what the official suite cannot check ---------------------------------------------------
async def test_connect_timeout_applies_to_a_ponging_client() -> None:
    """A client that answers pings but never connects a namespace is closed after connectTimeout."""
    async with running(ping_interval_ms=100, ping_timeout_ms=500, connect_timeout_ms=400) as node:
        raw = await Raw.connect(node.port)
        started = time.monotonic()
        assert await raw.closed(3.0)
        assert time.monotonic() - started >= 0.3
        assert counter(node, "roomcast_connections_refused_total", reason="connect_timeout") == 1


@pytest.mark.parametrize("bad", ["4abc", "42{}", '42abc["message",1]', '42["connect"]', "46"])
async def test_invalid_socketio_packets_close(bad: str) -> None:
    """Invalid Socket.IO packets (unknown type, bad payload, bad ack id) close the connection."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token()})
        assert (await raw.recv()).startswith("40")
        await raw.send(bad)
        assert await raw.closed()


async def test_event_for_unjoined_namespace_is_refused() -> None:
    """An event for a namespace the client never connected is dropped, counted, never handled."""
    app = Application()
    calls: list[Any] = []

    @app.on("hello", namespace="/other")
    async def hello(socket: Socket, *args: Any) -> None:
        calls.append(args)

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token()})
        assert (await raw.recv()).startswith("40")
        await raw.send('42/other,["hello",1]')
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        assert calls == []
        assert (
            counter(node, "roomcast_dropped_messages_total", reason="namespace_not_connected") == 1
        )


@pytest.mark.parametrize("auth", ['"token"', "[1]", "5"])
async def test_connect_with_non_object_auth_is_refused(auth: str) -> None:
    """A CONNECT whose auth payload is not an object closes the connection."""
    async with running() as node:
        raw = await Raw.connect(node.port)
        await raw.send("40" + auth)
        assert await raw.closed()


async def test_unknown_namespace() -> None:
    """Connecting an unknown namespace gets the spec's connect_error."""
    async with running() as node:
        raw = await Raw.connect(node.port)
        await raw.send("40/random,")
        assert await raw.recv() == '44/random,{"message":"Invalid namespace"}'


async def test_oversized_websocket_message_closes_only_that_client() -> None:
    """A WebSocket message over maxPayload closes that connection; other clients go on."""
    async with running(max_payload=500) as node:
        bad = await connect_sio(node.port, {"token": token()})
        good = await connect_sio(node.port, {"token": token()})
        assert (await bad.recv()).startswith("40") and (await good.recv()).startswith("40")
        await bad.send('42["x","' + "y" * 1000 + '"]')
        assert await bad.closed()
        await good.send('421["join","doc:1"]')
        assert await good.recv() == '431[{"ok":true}]'


async def test_too_many_attachments_closes() -> None:
    """A binary packet announcing more attachments than allowed closes the connection."""
    async with running(max_attachments=2) as node:
        raw = await connect_sio(node.port, {"token": token()})
        assert (await raw.recv()).startswith("40")
        await raw.send('453-["x"]')
        assert await raw.closed()
        assert counter(node, "roomcast_protocol_errors_total", reason="too_many_attachments") == 1


# -- authentication -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("auth", "code"),
    [
        (None, "token_missing"),
        ({"token": "not-a-jwt"}, "token_invalid"),
        ({"token": Authenticator(AuthSettings(secret="o" * 40)).mint("a", [])}, "token_invalid"),
        ({"token": "EXPIRED"}, "token_expired"),
    ],
)
async def test_auth_failures(auth: dict[str, Any] | None, code: str) -> None:
    """Each token failure is a connect_error whose data.code names it."""
    if auth is not None and auth["token"] == "EXPIRED":
        auth = {"token": _expired()}
    async with running() as node:
        raw = await connect_sio(node.port, auth)
        packet = await raw.recv()
        assert isinstance(packet, str) and packet.startswith("44")
        error = json.loads(packet[2:])
        assert error["data"]["code"] == code and error["message"]


def _expired() -> str:
    import jwt

    return jwt.encode({"sub": "a", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")


async def test_token_from_query_and_header() -> None:
    """The token may come from the query string or an Authorization header."""
    async with running() as node:
        raw = await Raw.connect(node.port, query=f"&token={token()}")
        await raw.send("40")
        assert (await raw.recv()).startswith('40{"sid"')
        ws = await websockets.connect(
            f"ws://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=websocket",
            additional_headers={"Authorization": f"Bearer {token()}"},
        )
        await ws.recv()
        await ws.send("40")
        assert str(await ws.recv()).startswith('40{"sid"')
        await ws.close()


async def test_token_expiry_disconnects() -> None:
    """A socket whose token expires while connected is told why and disconnected."""
    async with running() as node:
        import jwt

        short = jwt.encode({"sub": "a", "exp": int(time.time()) + 1}, SECRET, algorithm="HS256")
        raw = await connect_sio(node.port, {"token": short})
        assert (await raw.recv()).startswith("40")
        notice = await raw.recv(timeout=3)
        assert json.loads(str(notice)[2:]) == [
            "roomcast:disconnect",
            {"code": "token_expired", "message": "token expired"},
        ]
        assert await raw.recv() == "41"


# -- rooms and publishing -----------------------------------------------------------------------------
async def test_join_leave_authorization() -> None:
    """Join answers ok, forbidden or invalid_room; leave answers ok."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token(("doc:42", "team:7:*"))})
        assert (await raw.recv()).startswith("40")
        cases = [
            ('"doc:42"', {"ok": True}),
            ('"team:7:general"', {"ok": True}),
            ('"doc:43"', "forbidden"),
            ('"bad room!"', "invalid_room"),
            ("5", "invalid_room"),
            ('"' + "a" * 257 + '"', "invalid_room"),
        ]
        for ack_id, (room, expected) in enumerate(cases):
            await raw.send(f'42{ack_id}["join",{room}]')
            answer = json.loads(str(await raw.recv())[2 + len(str(ack_id)) :])[0]
            if isinstance(expected, dict):
                assert answer == expected
            else:
                assert answer["ok"] is False and answer["error"]["code"] == expected
                assert answer["error"]["message"]
        await raw.send('4299["leave","doc:42"]')
        assert await raw.recv() == '4399[{"ok":true}]'


async def test_publish_api_delivers_once_in_order() -> None:
    """Published events reach every member once, in publish order; ids are distinct."""
    async with running(recovery_max_disconnection_ms=0) as node:
        members = [await connect_sio(node.port, {"token": token()}) for _ in range(3)]
        for m in members:
            assert (await m.recv()).startswith("40")
            await m.send('421["join","doc:1"]')
            assert await m.recv() == '431[{"ok":true}]'
        ids = set()
        for i in range(20):
            status, body = await publish(
                node.port, {"room": "doc:1", "event": "e", "data": {"i": i}}
            )
            assert status == 202
            ids.add(body["id"])
        assert len(ids) == 20
        for m in members:
            got = [json.loads(str(await m.recv())[2:]) for _ in range(20)]
            assert got == [["e", {"i": i}] for i in range(20)]


async def test_publish_api_refuses_bad_key_and_delivers_nothing() -> None:
    """A wrong or missing API key answers 401 and nothing is delivered."""
    async with running(recovery_max_disconnection_ms=0) as node:
        raw = await connect_sio(node.port, {"token": token()})
        assert (await raw.recv()).startswith("40")
        await raw.send('421["join","doc:1"]')
        await raw.recv()
        status, body = await publish(
            node.port, {"room": "doc:1", "event": "e", "data": 1}, key="wrong"
        )
        assert status == 401 and body["error"]["code"] == "unauthorized"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{node.port}/api/v1/publish",
                json={"room": "doc:1", "event": "e", "data": 1},
            ) as response,
        ):
            assert response.status == 401
        status, _ = await publish(node.port, {"room": "doc:1", "event": "after", "data": 2})
        assert status == 202
        assert json.loads(str(await raw.recv())[2:]) == ["after", 2]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"room": "doc:1", "event": "e"}, "invalid_body"),
        ({"room": "bad room", "event": "e", "data": 1}, "invalid_room"),
        ({"room": "doc:1", "event": 5, "data": 1}, "invalid_event"),
        ({"room": "doc:1", "event": "e", "data": 1, "extra": 1}, "invalid_body"),
    ],
)
async def test_publish_api_validation(body: dict[str, Any], code: str) -> None:
    """Invalid publish bodies answer 400 with a code naming the problem."""
    async with running() as node:
        status, answer = await publish(node.port, body)
        assert status == 400 and answer["error"]["code"] == code


async def test_health_and_readiness() -> None:
    """/healthz answers while alive; /readyz reports the broker and turns false when draining."""
    async with running() as node:
        base = f"http://127.0.0.1:{node.port}"
        assert (await http("GET", base + "/healthz"))[0] == 200
        status, body, _ = await http("GET", base + "/readyz")
        assert status == 200 and json.loads(body)["broker"] == "connected"
        node.draining = True
        assert (await http("GET", base + "/readyz"))[0] == 503
        node.draining = False


# -- the Python API -------------------------------------------------------------------------------------
async def test_handler_ack_and_argument_check() -> None:
    """A handler's return value is the ack; an event with the wrong argument count is refused."""
    app = Application()

    @app.on("add")
    async def add(socket: Socket, a: int, b: int) -> int:
        return a + b

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token()})
        assert (await raw.recv()).startswith("40")
        await raw.send('421["add",2,3]')
        assert await raw.recv() == "431[5]"
        await raw.send('422["add",2]')
        answer = json.loads(str(await raw.recv())[3:])[0]
        assert answer["error"]["code"] == "bad_arguments"


async def test_server_to_client_ack() -> None:
    """socket.call() sends an event with an ack id and returns the client's ack arguments."""
    app = Application()
    results: asyncio.Queue[list[Any]] = asyncio.Queue()

    @app.on_connect()
    async def ask(socket: Socket) -> None:
        await results.put(await socket.call("question", 1))

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token()})
        assert (await raw.recv()).startswith("40")
        assert await raw.recv() == '421["question",1]'
        await raw.send('431["answer"]')
        assert await asyncio.wait_for(results.get(), 5) == ["answer"]


def test_handler_signatures_are_checked_at_registration() -> None:
    """Sync handlers, handlers without a socket parameter and wrong arities are refused early."""
    app = Application()
    with pytest.raises(HandlerSignatureError, match="async def"):
        app.on("x")(lambda socket: None)

    async def no_socket() -> None:
        return None

    with pytest.raises(HandlerSignatureError, match="socket"):
        app.on("x")(no_socket)

    async def bad_connect(socket: Socket, extra: int) -> None:
        return None

    with pytest.raises(HandlerSignatureError, match="exactly 0"):
        app.on_connect()(bad_connect)


def _masked(text: str) -> bytes:

    payload = text.encode()
    mask = os.urandom(4)
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def test_upgrade_packet_and_next_event_in_one_read() -> None:
    """An event sent in the same TCP segment as the upgrade packet is handled as an event."""
    async with running() as node:
        _, sid = await polling_session(node.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /socket.io/?EIO=4&transport=websocket&sid={sid} HTTP/1.1\r\nHost: x\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        writer.write(_masked("2probe"))
        assert (await reader.readexactly(8))[2:] == b"3probe"
        writer.write(_masked("5") + _masked('421["join","doc:7"]'))  # one write, one read
        seen = b""
        while b'431[{"ok":true}]' not in seen:
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            assert chunk, f"the server closed the connection; it sent {seen!r}"
            seen += chunk
        writer.close()
