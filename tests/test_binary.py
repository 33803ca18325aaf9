"""Binary to rooms, in process over real sockets (raw WebSocket and polling clients): bytes in a
publication reach members as Socket.IO binary attachments, encoded once per broadcast, from the
publish API's ``{"$binary": ...}``, from ``Publisher`` and from handlers; recovery replays them
byte for byte; upstream events keep them."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import pytest
from hub_fakes import Member, RecordingTransport

from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast.app import Application
from roomcast.connection import Connection, Flusher
from roomcast.hub import Hub, encode_messages
from roomcast.jsonbytes import BinaryMarkerError, decode_markers, may_hold_markers
from roomcast.metrics import Metrics
from roomcast.protocol import engineio
from roomcast.protocol.socketio import JSON_PARSER, Packet, PacketType
from roomcast.publisher import Publisher
from roomcast.socket import Socket
from roomcast.transport.http import Request
from roomcast.transport.websocket import binary_frame, text_frame
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId
from wire import API_KEY, Raw, connect_sio, publish, running

ALL_BYTES = bytes(range(256))
PLACEHOLDER = {"_placeholder": True, "num": 0}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def joined(port: int, room: str = "doc:1", **auth: Any) -> tuple[Raw, dict[str, Any]]:
    """A raw WebSocket client connected to ``/`` and in ``room``; and the CONNECT answer."""
    raw = await connect_sio(port, {"token": token_for("doc:*"), **auth})
    hello = json.loads(str(await raw.recv())[2:])
    await raw.send(f'421["join","{room}"]')
    assert await raw.recv() == '431[{"ok":true}]'
    return raw, hello


async def binary_event(raw: Raw) -> tuple[list[Any], list[bytes]]:
    """The next binary event: its JSON (with placeholders) and its attachments."""
    head = await raw.recv()
    assert isinstance(head, str) and head.startswith("45"), head
    count, _, body = head[2:].partition("-")
    attachments = [await raw.recv() for _ in range(int(count))]
    assert all(isinstance(a, bytes) for a in attachments)
    return json.loads(body), attachments  # type: ignore[return-value]


async def test_published_bytes_reach_websocket_members_as_attachments() -> None:
    """``{"$binary": base64}`` in the publish API's data is bytes: members get a binary event
    (placeholder in the JSON, the bytes as a binary frame), byte for byte; JSON events
    around it are plain text events as before."""
    async with running() as node:
        raw, _ = await joined(node.port)
        data = {"name": "a.bin", "body": {"$binary": b64(ALL_BYTES)}, "parts": [{"$binary": ""}]}
        status, answer = await publish(node.port, {"room": "doc:1", "event": "file", "data": data})
        assert status == 202, answer
        args, attachments = await binary_event(raw)
        body = {"name": "a.bin", "body": PLACEHOLDER, "parts": [{"_placeholder": True, "num": 1}]}
        assert args == ["file", body, answer["offset"]]
        assert attachments == [ALL_BYTES, b""]
        await publish(node.port, {"room": "doc:1", "event": "plain", "data": {"n": 1}})
        text = await raw.recv()
        assert isinstance(text, str) and text.startswith('42["plain",{"n":1},'), text


async def test_published_bytes_reach_polling_members_in_the_payload() -> None:
    """A polling member gets the binary event and its attachment (``b`` + base64) in one
    payload."""
    async with running() as node, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        async with session.get(base) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        url = f"{base}&sid={sid}"

        async def post(body: str) -> None:
            async with session.post(url, data=body) as response:
                assert response.status == 200, await response.text()

        async def poll() -> list[str | bytes]:
            async with session.get(url) as response:
                body = await response.read()
            return [p.serialize() for p in engineio.decode_payload(body, max_payload=1 << 20)]

        await post("40" + json.dumps({"token": token_for("doc:*")}))
        assert str((await poll())[0]).startswith("40")
        await post('421["join","doc:1"]')
        assert await poll() == ['431[{"ok":true}]']
        waiting = asyncio.create_task(poll())
        await eventually(lambda: ("/", "doc:1") in node.hub.rooms, what="the join")
        data = {"$binary": b64(ALL_BYTES)}
        _, answer = await publish(node.port, {"room": "doc:1", "event": "file", "data": data})
        head, attachment = await waiting
        assert head == "451-" + json.dumps(["file", PLACEHOLDER, answer["offset"]]).replace(" ", "")
        assert attachment == ALL_BYTES


async def test_publish_api_binary_markers() -> None:
    """Bad base64 or a non-string ``$binary`` is a 400 ``invalid_binary`` and publishes
    nothing; an escaped key is the same key; an object with other keys is plain JSON."""
    async with running() as node:
        raw, _ = await joined(node.port)
        for bad in ("not base64!", "QUJD=", "QQ", "QR==", "QU JD", 7, None):
            status, answer = await publish(
                node.port, {"room": "doc:1", "event": "e", "data": [{"$binary": bad}]}
            )
            assert (status, answer["error"]["code"]) == (400, "invalid_binary"), (bad, answer)
            assert "$binary" in answer["error"]["message"]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{node.port}/api/v1/publish",
                data=b'{"room":"doc:1","event":"e","data":{"\\u0024binary":"AAE="}}',
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as response,
        ):
            assert response.status == 202, await response.text()
        args, attachments = await binary_event(raw)
        assert (args[1], attachments) == (PLACEHOLDER, [b"\x00\x01"])
        mongo = {"$binary": "AAE=", "$type": "00"}
        await publish(node.port, {"room": "doc:1", "event": "e", "data": mongo})
        assert json.loads(str(await raw.recv())[2:])[1] == mongo


async def test_publisher_and_handler_bytes_reach_members() -> None:
    """``Publisher.publish`` with bytes, and a handler's ``app.to(room).emit`` with bytes, reach
    members as attachments; ``socket.emit`` of bytes answers the socket itself the same way."""
    app = Application()

    @app.on("send-file")
    async def send_file(socket: Socket, room: str) -> None:
        await app.to(room).emit("file", {"from": "handler", "body": b"\x00handler\xff"})
        socket.emit("own", b"\x01")

    async with running(app) as node:
        raw, _ = await joined(node.port)
        publisher = Publisher(node.broker)
        await publisher.publish("doc:1", "file", {"from": "publisher", "body": ALL_BYTES})
        args, attachments = await binary_event(raw)
        assert args[:2] == ["file", {"from": "publisher", "body": PLACEHOLDER}]
        assert attachments == [ALL_BYTES]
        await raw.send('42["send-file","doc:1"]')
        received = [await binary_event(raw), await binary_event(raw)]
        by_event = {args[0]: (args, attachments) for args, attachments in received}
        assert by_event["file"][0][1] == {"from": "handler", "body": PLACEHOLDER}
        assert by_event["file"][1] == [b"\x00handler\xff"]
        assert by_event["own"] == (["own", PLACEHOLDER], [b"\x01"])


async def test_recovery_replays_binary_publications_byte_for_byte() -> None:
    """Binary publications missed while away come back, attachments and all, before live ones."""
    async with running() as node:
        raw, hello = await joined(node.port)
        await publish(node.port, {"room": "doc:1", "event": "e", "data": 0})
        offset = json.loads(str(await raw.recv())[2:])[-1]
        raw.ws.transport.abort()
        await eventually(lambda: not node.sockets.sockets, what="the dropped connection")
        missed = [ALL_BYTES, ALL_BYTES[::-1]]
        for blob in missed:
            data = {"blob": {"$binary": b64(blob)}}
            await publish(node.port, {"room": "doc:1", "event": "file", "data": data})
        await node.sockets.session_writer.flush()
        back = await Raw.connect(node.port)
        auth = {"token": token_for("doc:*"), "pid": hello["pid"], "offset": offset}
        await back.send("40" + json.dumps(auth))
        assert json.loads(str(await back.recv())[2:])["sid"] == hello["sid"]
        for blob in missed:
            args, attachments = await binary_event(back)
            assert (args[1], attachments) == ({"blob": PLACEHOLDER}, [blob])
        await publish(node.port, {"room": "doc:1", "event": "live", "data": {"$binary": "AQ=="}})
        args, attachments = await binary_event(back)
        assert (args[0], attachments) == ("live", [b"\x01"])


async def test_upstream_events_keep_their_bytes() -> None:
    """A client's binary upstream event is stored as a binary entry (placeholders in data,
    the bytes beside it), like a binary publication."""
    async with running(upstream_events=("upload",)) as node:
        raw, _ = await joined(node.port)
        await raw.send('451-1["upload",{"name":"x","body":{"_placeholder":true,"num":0}}]')
        await raw.send(b"\x00\x01\xff")
        ack = json.loads(str(await raw.recv())[3:])
        assert ack[0]["ok"] is True
        memory: Any = node.broker
        _, fields = memory.upstream[-1]
        assert json.loads(fields["data"]) == {"name": "x", "body": PLACEHOLDER}
        assert (fields["attachments"], fields["attachment:0"]) == ("1", b"\x00\x01\xff")


# --------------------------------------------------------------------------- the hub, sans I/O


def _connection(flusher: Flusher, name: str) -> Connection:
    return Connection(
        SessionId(name),
        Request("GET", "/socket.io/", {}, {}),
        ping_interval=25,
        ping_timeout=20,
        limit=1 << 20,
        flusher=flusher,
        metrics=Metrics(),
        on_closed=lambda _conn, _reason: None,
    )


async def test_a_binary_broadcast_is_one_write_per_member_and_survives_an_upgrade() -> None:
    """The hub encodes a binary broadcast once: a WebSocket member gets the text frame and the
    binary frame in one write; a polling member's queued payload text, if it then upgrades,
    goes out as the same frames."""
    flusher = Flusher()
    hub = Hub(lambda key: None, lambda key: None, flusher)
    room = ("/", "doc:1")
    ws_conn, transport = _connection(flusher, "ws"), RecordingTransport()
    ws_conn.use_websocket(WebSocketConnection(transport, None, 1 << 20))  # type: ignore[arg-type]
    polling = _connection(flusher, "polling")
    for conn in (ws_conn, polling):
        hub.join(Member(conn), room)  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    transport.writes.clear()

    assert hub.broadcast(room, "file", {"body": ALL_BYTES}, offset="5-0") == 2

    head = '451-["file",{"body":{"_placeholder":true,"num":0}},"5-0"]'
    frames = text_frame(head.encode()) + binary_frame(ALL_BYTES)
    assert transport.writes == [frames]
    _, text = encode_messages(JSON_PARSER.encode(Packet(PacketType.EVENT, "/", ["x", b"\x00"])))
    assert engineio.decode_payload(text().encode(), max_payload=1000) == [
        engineio.Packet(engineio.PacketType.MESSAGE, '51-["x",{"_placeholder":true,"num":0}]'),
        engineio.Packet(engineio.PacketType.MESSAGE, b"\x00"),
    ]
    later = RecordingTransport()
    polling.use_websocket(WebSocketConnection(later, None, 1 << 20))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert later.writes == [frames]


async def test_memory_history_carries_bytes() -> None:
    """The in-memory broker hands bytes through to delivery and to history unchanged."""
    async with running() as node:
        publisher = Publisher(node.broker)
        await publisher.publish("doc:2", "file", [ALL_BYTES])
        history = await node.broker.history("doc:2", "0")
        assert [p.data for p in history.publications] == [[ALL_BYTES]]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"$binary": "AAH/"}, b"\x00\x01\xff"),
        ({"$binary": ""}, b""),
        ([{"a": {"$binary": "AA=="}}, {"$binary": "AQ=="}], [{"a": b"\x00"}, b"\x01"]),
        ({"$binary": "AA==", "$type": "00"}, {"$binary": "AA==", "$type": "00"}),
        ({"$binary_": "AA=="}, {"$binary_": "AA=="}),
        ("AA==", "AA=="),
        (None, None),
    ],
)
def test_binary_markers(data: Any, expected: Any) -> None:
    """Exactly ``{"$binary": base64}`` is bytes, anywhere; anything else stays JSON."""
    assert decode_markers(data) == expected


@pytest.mark.parametrize(
    "value", ["AAE", "AAE==", "QR==", "AA AA", "AA==\n", "ÀA==", "AA-_", 1, None, ["AA=="]]
)
def test_bad_binary_markers(value: Any) -> None:
    """Only the one standard form of base64 text: padded, RFC 4648 alphabet, nothing extra."""
    with pytest.raises(BinaryMarkerError, match=r"\$binary"):
        decode_markers({"x": [{"$binary": value}]})


def test_marker_detection_sees_escaped_keys() -> None:
    """A body that could spell the key with escapes is searched too."""
    assert may_hold_markers(b'{"$binary":"AA=="}')
    assert may_hold_markers(b'{"\\u0024binary":"AA=="}')
    assert not may_hold_markers(b'{"room":"doc:1","data":{"n":1}}')


def test_an_object_with_placeholder_true_is_an_attachment_or_an_error() -> None:
    """socket.io-parser takes any object with "_placeholder": true for an attachment, other
    keys or not: a client's such object is resolved or refused, and data that would put one
    beside bytes is never encoded (clients would fail to parse the broadcast)."""
    from roomcast.broker.envelope import EnvelopeError, encode_data
    from roomcast.protocol.errors import SocketIOError
    from roomcast.protocol.socketio import PlaceholderError, dumps_binary, reconstruct

    assert reconstruct([{"_placeholder": True, "num": 0}], [b"x"]) == [b"x"]
    for fake in ({"_placeholder": True, "num": 0, "x": 1}, {"_placeholder": True, "num": 5}):
        with pytest.raises(SocketIOError, match="placeholder"):
            reconstruct([fake], [b"x"])
    sneaky = {"a": b"\x00", "b": {"_placeholder": True, "num": 3, "x": 1}}
    with pytest.raises(PlaceholderError):
        dumps_binary(sneaky, [])
    with pytest.raises(EnvelopeError, match="_placeholder"):
        encode_data(sneaky)
    assert encode_data({"_placeholder": True, "num": 0})[1] == []  # no bytes: plain JSON
