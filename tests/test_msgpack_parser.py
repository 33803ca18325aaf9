"""socket.io-msgpack-parser's wire format (sans-I/O): what the official client's notepack.io
writes, what the server writes back, the official parser's checks, and round trips."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import msgpack
import pytest
from hub_fakes import Member, RecordingTransport
from hypothesis import given
from hypothesis import strategies as st

from conftest_helpers import token_for
from redis_fixtures import eventually
from roomcast.connection import Connection, Flusher
from roomcast.hub import Hub
from roomcast.metrics import Metrics
from roomcast.protocol import engineio
from roomcast.protocol.errors import NestingTooDeepError, SocketIOError, TooManyAttachmentsError
from roomcast.protocol.msgpack_parser import MSGPACK_PARSER, InvalidMsgpackError
from roomcast.protocol.parser import PARSERS, parser_named
from roomcast.protocol.socketio import JSON_PARSER, Limits, Packet, PacketType
from roomcast.transport.http import Request
from roomcast.transport.websocket import binary_frame
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId
from wire import Raw, publish, running

LIMITS = Limits(max_attachments=3, max_nesting=8)
ALL_BYTES = bytes(range(256))


def _map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map written field by field, as notepack.io writes it (keys in JS order)."""
    body = b"".join(msgpack.packb(key) + value for key, value in pairs)
    return bytes([0x80 | len(pairs)]) + body


def decode(message: bytes | str) -> Packet:
    packet = MSGPACK_PARSER.decoder(LIMITS).feed(message)
    assert packet is not None
    return packet


# (what notepack.io writes for socket.io-client, the packet the server reads)
CLIENT_PACKETS = [
    (  # io(url) with no auth: data is undefined, fixext 1 of type 0
        _map(("type", b"\x00"), ("data", b"\xd4\x00\x00"), ("nsp", b"\xa1/")),
        Packet(PacketType.CONNECT, "/", None),
    ),
    (
        _map(("type", b"\x00"), ("data", msgpack.packb({"token": "t"})), ("nsp", b"\xa5/docs")),
        Packet(PacketType.CONNECT, "/docs", {"token": "t"}),
    ),
    (  # socket.emit("join", "doc:1", ack): options travel too, and are ignored
        _map(
            ("type", b"\x02"),
            ("data", msgpack.packb(["join", "doc:1"])),
            ("options", msgpack.packb({"compress": True})),
            ("id", b"\x00"),
            ("nsp", b"\xa1/"),
        ),
        Packet(PacketType.EVENT, "/", ["join", "doc:1"], 0),
    ),
    (  # a Node Buffer is bin 8; a browser ArrayBuffer is ext 8 of type 0
        _map(
            ("type", b"\x02"),
            ("data", b"\x93\xa4file\xc4\x02\x00\xff\xc7\x03\x00\x01\x02\x03"),
            ("nsp", b"\xa1/"),
        ),
        Packet(PacketType.EVENT, "/", ["file", b"\x00\xff", b"\x01\x02\x03"]),
    ),
    (
        _map(
            ("type", b"\x03"),
            ("data", msgpack.packb([{"ok": 1}])),
            ("id", b"\x07"),
            ("nsp", b"\xa1/"),
        ),
        Packet(PacketType.ACK, "/", [{"ok": 1}], 7),
    ),
    (_map(("type", b"\x01"), ("nsp", b"\xa2/a")), Packet(PacketType.DISCONNECT, "/a")),
]


@pytest.mark.parametrize(("message", "packet"), CLIENT_PACKETS)
def test_client_packets_decode(message: bytes, packet: Packet) -> None:
    """Packets as the official client writes them decode to the server's packets."""
    assert decode(message) == packet


# (the server's packet, the map the client decodes)
SERVER_PACKETS = [
    (
        Packet(PacketType.CONNECT, "/", {"sid": "s", "pid": "p"}),
        {"type": 0, "nsp": "/", "data": {"sid": "s", "pid": "p"}},
    ),
    (Packet(PacketType.DISCONNECT, "/docs"), {"type": 1, "nsp": "/docs"}),
    (
        Packet(PacketType.EVENT, "/", ["news", {"n": 1}, "1-0"]),
        {"type": 2, "nsp": "/", "data": ["news", {"n": 1}, "1-0"]},
    ),
    (
        Packet(PacketType.EVENT, "/", ["file", b"\x00\x01"]),
        {"type": 2, "nsp": "/", "data": ["file", b"\x00\x01"]},
    ),
    (Packet(PacketType.EVENT, "/", ["ask"], 3), {"type": 2, "nsp": "/", "data": ["ask"], "id": 3}),
    (
        Packet(PacketType.BINARY_ACK, "/", [b"x"], 4),
        {"type": 3, "nsp": "/", "data": [b"x"], "id": 4},
    ),
    (
        Packet(PacketType.CONNECT_ERROR, "/", {"message": "no"}),
        {"type": 4, "nsp": "/", "data": {"message": "no"}},
    ),
]


@pytest.mark.parametrize(("packet", "expected"), SERVER_PACKETS)
def test_server_packets_encode(packet: Packet, expected: dict[str, Any]) -> None:
    """One binary message per packet; data and id are left out when absent (the official
    decoder refuses a DISCONNECT whose data is null, and an id that is not an integer), and
    bytes are msgpack bin (a Buffer in Node, an ArrayBuffer in browsers)."""
    messages = MSGPACK_PARSER.encode(packet)
    assert len(messages) == 1 and isinstance(messages[0], bytes)
    assert msgpack.unpackb(messages[0]) == expected
    if b"\x00\x01" in messages[0]:
        assert b"\xc4\x02\x00\x01" in messages[0]


INVALID = [
    ("text", "expects binary"),
    (b"\xc1", "invalid msgpack"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a"]}) + b"\x00", "invalid msgpack"),
    (msgpack.packb([2, "/", ["a"]]), "not a msgpack map"),
    (msgpack.packb({"type": 5, "nsp": "/", "data": ["a"]}), "invalid packet type"),
    (msgpack.packb({"type": True, "nsp": "/", "data": ["a"]}), "invalid packet type"),
    (msgpack.packb({"type": 2, "data": ["a"]}), "invalid namespace"),
    (msgpack.packb({"type": 2, "nsp": "admin", "data": ["a"]}), "invalid namespace"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a"], "id": -1}), "invalid ack id"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a"], "id": "1"}), "invalid ack id"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a"], "id": 2**53}), "invalid ack id"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": {"a": 1}}), "invalid payload for EVENT"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": []}), "invalid payload for EVENT"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["disconnect"]}), "invalid payload for EVENT"),
    (msgpack.packb({"type": 0, "nsp": "/", "data": "t"}), "invalid payload for CONNECT"),
    (msgpack.packb({"type": 3, "nsp": "/", "data": []}), "ack packet without an ack id"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a", {1: "x"}]}), "not allowed for map key"),
    (
        msgpack.packb({"type": 2, "nsp": "/", "data": ["a", {b"k": "x"}]}),
        "map keys must be strings",
    ),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a", msgpack.ExtType(5, b"x")]}), "ext type 5"),
    (msgpack.packb({"type": 2, "nsp": "/", "data": ["a", msgpack.Timestamp(1)]}), "Timestamp"),
]


@pytest.mark.parametrize(("message", "words"), INVALID)
def test_invalid_packets_are_refused(message: bytes | str, words: str) -> None:
    """What the official decoder refuses, and what is not JSON plus bytes, is a protocol error."""
    with pytest.raises(SocketIOError, match=words):
        decode(message)


def test_limits_apply_as_with_the_json_parser() -> None:
    """Nesting depth and the number of binary values are bounded like the JSON parser's."""
    deep: Any = "x"
    for _ in range(9):
        deep = [deep]
    with pytest.raises(NestingTooDeepError):
        decode(msgpack.packb({"type": 2, "nsp": "/", "data": deep}))
    with pytest.raises(TooManyAttachmentsError):
        decode(msgpack.packb({"type": 2, "nsp": "/", "data": ["a", b"1", b"2", b"3", b"4"]}))
    assert decode(msgpack.packb({"type": 2, "nsp": "/", "data": ["a", b"1", b"2", b"3"]}))
    with pytest.raises(InvalidMsgpackError):  # msgpack's own stack limit, far below Python's
        decode(b"\x91" * 100_000 + b"\xc0")


def test_parsers_by_name() -> None:
    """The ``parser`` setting's names pick the two parsers; decoders of either are idle
    between packets."""
    assert parser_named("json") is JSON_PARSER
    assert parser_named("msgpack") is MSGPACK_PARSER
    assert set(PARSERS) == {"json", "msgpack"}
    assert MSGPACK_PARSER.decoder(LIMITS).idle


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
values = st.recursive(
    json_values | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=3),
    max_leaves=6,
)


@given(
    event=st.text(min_size=1, max_size=12).filter(
        lambda s: (
            s
            not in {
                "connect",
                "disconnect",
                "connect_error",
                "disconnecting",
                "newListener",
                "removeListener",
            }
        )
    ),
    args=st.lists(values, max_size=3),
    nsp=st.sampled_from(["/", "/admin", "/a-b"]),
    ack=st.none() | st.integers(0, 2**53 - 1),
)
def test_event_round_trip(event: str, args: list[Any], nsp: str, ack: int | None) -> None:
    """Any event the server encodes decodes back to itself (NaN aside, which equals nothing)."""
    packet = Packet(PacketType.EVENT, nsp, [event, *args], ack)
    (message,) = MSGPACK_PARSER.encode(packet)
    assert isinstance(message, bytes)
    back = MSGPACK_PARSER.decoder(Limits(max_attachments=1000, max_nesting=64)).feed(message)
    assert back is not None
    assert (back.type, back.namespace, back.id) == (PacketType.EVENT, nsp, ack)
    assert msgpack.packb(back.data) == msgpack.packb(packet.data)


# --------------------------------------------------------------------------- a server, in process


def _packet(kind: int, data: Any = None, ack: int | None = None, nsp: str = "/") -> bytes:
    body: dict[str, Any] = {"type": kind, "nsp": nsp}
    if data is not None:
        body["data"] = data
    if ack is not None:
        body["id"] = ack
    packed: bytes = msgpack.packb(body)
    return packed


async def _recv(raw: Raw) -> dict[str, Any]:
    message = await raw.recv()
    assert isinstance(message, bytes), message
    value: dict[str, Any] = msgpack.unpackb(message)
    return value


async def _joined(port: int, **auth: Any) -> tuple[Raw, dict[str, Any]]:
    raw = await Raw.connect(port)
    await raw.send(_packet(0, {"token": token_for("doc:*"), **auth}))
    hello = await _recv(raw)
    assert hello["type"] == 0 and set(hello["data"]) == {"sid", "pid"}, hello
    await raw.send(_packet(2, ["join", "doc:1"], ack=1))
    assert await _recv(raw) == {"type": 3, "nsp": "/", "data": [{"ok": True}], "id": 1}
    return raw, hello["data"]


async def test_a_msgpack_server_over_websocket() -> None:
    """With ``parser = "msgpack"`` every packet is one msgpack message both ways: connect,
    join with an ack, JSON and binary publications (bytes inline); a text message is a
    protocol error that closes the session."""
    async with running(parser="msgpack") as node:
        raw, _ = await _joined(node.port)
        _, first = await publish(node.port, {"room": "doc:1", "event": "news", "data": {"n": 1}})
        assert await _recv(raw) == {
            "type": 2,
            "nsp": "/",
            "data": ["news", {"n": 1}, first["offset"]],
        }
        data = {"body": {"$binary": base64.b64encode(ALL_BYTES).decode()}}
        _, second = await publish(node.port, {"room": "doc:1", "event": "file", "data": data})
        assert await _recv(raw) == {
            "type": 2,
            "nsp": "/",
            "data": ["file", {"body": ALL_BYTES}, second["offset"]],
        }
        await raw.send('42["join","doc:2"]')
        assert await raw.closed()
        assert node.metrics.protocol_errors.labels("invalid_msgpack")._value.get() == 1


async def test_a_msgpack_server_over_polling_and_recovery() -> None:
    """Over polling each packet is a ``b`` + base64 message; a client that comes back with
    its pid and offset gets the binary publications it missed, in msgpack, byte for byte."""
    async with running(parser="msgpack") as node, aiohttp.ClientSession() as session:
        raw, hello = await _joined(node.port)
        _, first = await publish(node.port, {"room": "doc:1", "event": "e", "data": 0})
        assert (await _recv(raw))["data"] == ["e", 0, first["offset"]]
        raw.ws.transport.abort()
        await eventually(lambda: not node.sockets.sockets, what="the dropped connection")
        blob = {"$binary": base64.b64encode(ALL_BYTES).decode()}
        _, missed = await publish(node.port, {"room": "doc:1", "event": "file", "data": blob})
        await node.sockets.session_writer.flush()

        base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
        async with session.get(base) as response:
            sid = json.loads((await response.text())[1:])["sid"]
        url = f"{base}&sid={sid}"
        auth = {"token": token_for("doc:*"), "pid": hello["pid"], "offset": first["offset"]}
        connect = "b" + base64.b64encode(_packet(0, auth)).decode()
        async with session.post(url, data=connect) as response:
            assert response.status == 200
        received: list[dict[str, Any]] = []
        while len(received) < 2:
            async with session.get(url) as response:
                body = await response.read()
            for packet in engineio.decode_payload(body, max_payload=1 << 20):
                assert isinstance(packet.data, bytes), packet
                received.append(msgpack.unpackb(packet.data))
        assert received[0]["data"] == {"sid": hello["sid"], "pid": hello["pid"]}
        assert received[1] == {
            "type": 2,
            "nsp": "/",
            "data": ["file", ALL_BYTES, missed["offset"]],
        }


async def test_a_queued_msgpack_broadcast_goes_out_as_one_binary_frame_after_an_upgrade() -> None:
    """A msgpack broadcast queued for a polling member (``b`` + base64) becomes one binary
    frame when that member upgrades to WebSocket."""
    flusher = Flusher()
    hub = Hub(lambda key: None, lambda key: None, flusher, MSGPACK_PARSER)
    polling = Connection(
        SessionId("p"),
        Request("GET", "/socket.io/", {}, {}),
        ping_interval=25,
        ping_timeout=20,
        limit=1 << 20,
        flusher=flusher,
        metrics=Metrics(),
        on_closed=lambda _conn, _reason: None,
    )
    member = Member(polling)
    hub.join(member, ("/", "doc:1"))  # type: ignore[arg-type]
    hub.broadcast(("/", "doc:1"), "file", b"\x00\x01")
    transport = RecordingTransport()
    polling.use_websocket(WebSocketConnection(transport, None, 1 << 20))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    (message,) = MSGPACK_PARSER.encode(Packet(PacketType.EVENT, "/", ["file", b"\x00\x01"]))
    assert isinstance(message, bytes)
    assert transport.writes == [binary_frame(message)]
