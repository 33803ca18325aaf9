"""Sans-I/O protocol tests: the specs' examples as tables, plus Hypothesis round-trips."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomcast.protocol import engineio
from roomcast.protocol.errors import (
    EngineIOError,
    InvalidJSONError,
    NestingTooDeepError,
    PayloadTooLargeError,
    SocketIOError,
    TooManyAttachmentsError,
)
from roomcast.protocol.socketio import Decoder, Limits, Packet, PacketType, parse_text

LIMITS = Limits(max_attachments=3, max_nesting=8)

# (wire text, type, namespace, data, ack id) - examples from the Socket.IO v5 spec
VALID = [
    ("0", PacketType.CONNECT, "/", None, None),
    ('0{"token":"123"}', PacketType.CONNECT, "/", {"token": "123"}, None),
    ("0/admin,", PacketType.CONNECT, "/admin", None, None),
    ('0/admin,{"token":"abc"}', PacketType.CONNECT, "/admin", {"token": "abc"}, None),
    ("0/random", PacketType.CONNECT, "/random", None, None),
    ("1", PacketType.DISCONNECT, "/", None, None),
    ("1/admin,", PacketType.DISCONNECT, "/admin", None, None),
    ('2["foo"]', PacketType.EVENT, "/", ["foo"], None),
    ('2/admin,["bar"]', PacketType.EVENT, "/admin", ["bar"], None),
    ('212["foo"]', PacketType.EVENT, "/", ["foo"], 12),
    ('2/admin,13["bar"]', PacketType.EVENT, "/admin", ["bar"], 13),
    ("3/admin,13[]", PacketType.ACK, "/admin", [], 13),
    ('312["bar"]', PacketType.ACK, "/", ["bar"], 12),
    (
        '4{"message":"Not authorized"}',
        PacketType.CONNECT_ERROR,
        "/",
        {"message": "Not authorized"},
        None,
    ),
    ("2[1,2]", PacketType.EVENT, "/", [1, 2], None),
]

INVALID = [
    ("", SocketIOError, "empty"),
    ("abc", SocketIOError, "unknown packet type"),
    ("7", SocketIOError, "unknown packet type"),
    ("2{}", SocketIOError, "invalid payload for EVENT"),
    ('2abc["x"]', InvalidJSONError, "invalid json"),
    ("2[]", SocketIOError, "invalid payload"),
    ('2["connect"]', SocketIOError, "invalid payload"),
    ('2["disconnect",1]', SocketIOError, "invalid payload"),
    ("2[true]", SocketIOError, "invalid payload"),
    ("2[null]", SocketIOError, "invalid payload"),
    ('0"token"', SocketIOError, "invalid payload for CONNECT"),
    ("0[1]", SocketIOError, "invalid payload for CONNECT"),
    ("1{}", SocketIOError, "invalid payload for DISCONNECT"),
    ("3[1]", SocketIOError, "ack packet without an ack id"),
    ('5["x"]', SocketIOError, "invalid attachment count"),
    ('5a-["x"]', SocketIOError, "invalid attachment count"),
    ('54-["x"]', TooManyAttachmentsError, "exceed the limit"),
    ("2" + "[" * 9 + "]" * 9, NestingTooDeepError, "nesting"),
    ('29007199254740993["x"]', SocketIOError, "out of range"),
    ('2["x"', InvalidJSONError, "invalid json"),
]


@pytest.mark.parametrize(("text", "kind", "nsp", "data", "ack"), VALID)
def test_parse_valid(text: str, kind: PacketType, nsp: str, data: Any, ack: int | None) -> None:
    """Every example packet of the spec decodes to its type, namespace, payload and ack id."""
    packet = parse_text(text, LIMITS)
    assert (packet.type, packet.namespace, packet.data, packet.id) == (kind, nsp, data, ack)


@pytest.mark.parametrize(("text", "error", "words"), INVALID)
def test_parse_invalid(text: str, error: type[Exception], words: str) -> None:
    """Malformed packets raise the matching error, whose message names what was wrong."""
    with pytest.raises(error, match=words):
        parse_text(text, LIMITS)


def test_binary_event_reassembled() -> None:
    """A binary event waits for its attachments, then has them in place of the placeholders."""
    decoder = Decoder(LIMITS)
    head = '52-["m",{"_placeholder":true,"num":0},{"k":{"_placeholder":true,"num":1}}]'
    assert decoder.feed(head) is None
    assert decoder.feed(b"\x01") is None
    packet = decoder.feed(b"\x02")
    assert packet is not None
    assert packet.data == ["m", b"\x01", {"k": b"\x02"}]


def test_binary_ack_with_namespace_and_id() -> None:
    """A binary ack keeps its namespace and ack id."""
    decoder = Decoder(LIMITS)
    assert decoder.feed('61-/admin,789[{"_placeholder":true,"num":0}]') is None
    packet = decoder.feed(b"xyz")
    assert packet is not None
    assert (packet.type, packet.namespace, packet.id, packet.data) == (
        PacketType.BINARY_ACK,
        "/admin",
        789,
        [b"xyz"],
    )


@pytest.mark.parametrize(
    ("feed", "words"),
    [
        ([b"\x00"], "unexpected binary attachment"),
        (['51-["m",{"_placeholder":true,"num":0}]', '2["x"]'], "while waiting for attachments"),
        (['51-["m",{"_placeholder":true,"num":5}]', b"a"], "invalid attachment placeholder"),
    ],
)
def test_decoder_sequence_errors(feed: list[str | bytes], words: str) -> None:
    """Attachments out of sequence or pointing nowhere are protocol errors."""
    decoder = Decoder(LIMITS)
    with pytest.raises(SocketIOError, match=words):
        for item in feed:
            decoder.feed(item)


def test_serialize_binary_event() -> None:
    """Bytes in an event become placeholders and attachments, and the type becomes binary."""
    out = Packet(PacketType.EVENT, "/", ["up", b"\x01\x02", {"n": b"\x03"}], 4).serialize()
    assert out == [
        '52-4["up",{"_placeholder":true,"num":0},{"n":{"_placeholder":true,"num":1}}]',
        b"\x01\x02",
        b"\x03",
    ]


def test_serialize_plain() -> None:
    """Plain packets encode compactly with namespace and ack id."""
    assert Packet(PacketType.EVENT, "/x", ["a", 1]).serialize() == ['2/x,["a",1]']
    assert Packet(PacketType.ACK, "/", [], 7).serialize() == ["37[]"]
    assert Packet(PacketType.CONNECT, "/", {"sid": "s"}).serialize() == ['0{"sid":"s"}']
    assert Packet(PacketType.DISCONNECT, "/a").serialize() == ["1/a,"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
binary_values = st.recursive(
    json_values | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=3),
    max_leaves=6,
)


@given(
    event=st.text(min_size=1, max_size=12).filter(lambda s: s not in {"connect", "disconnect"}),
    args=st.lists(binary_values, max_size=3),
    nsp=st.sampled_from(["/", "/admin", "/a-b"]),
    ack=st.none() | st.integers(0, 2**40),
)
def test_event_round_trip(event: str, args: list[Any], nsp: str, ack: int | None) -> None:
    """Any event serialized and fed back through the decoder comes out equal."""
    if event in {"connect_error", "disconnecting", "newListener", "removeListener"}:
        return
    messages = Packet(PacketType.EVENT, nsp, [event, *args], ack).serialize()
    decoder = Decoder(Limits(max_attachments=1000, max_nesting=64))
    result = None
    for message in messages:
        result = decoder.feed(message)
    assert result is not None
    assert (result.namespace, result.id, result.data) == (nsp, ack, [event, *args])


# -- Engine.IO ---------------------------------------------------------------------------------------
def test_engine_packets() -> None:
    """Engine.IO packets parse by their type digit; bytes are binary messages."""
    assert engineio.Packet.parse("4hello") == engineio.Packet(engineio.PacketType.MESSAGE, "hello")
    assert engineio.Packet.parse("2probe").type is engineio.PacketType.PING
    assert engineio.Packet.parse(b"\x01").data == b"\x01"
    for bad in ("", "9", "x"):
        with pytest.raises(EngineIOError):
            engineio.Packet.parse(bad)


def test_polling_payload_spec_example() -> None:
    """The spec's mixed payload decodes to a text and a binary packet and encodes back."""
    packets = engineio.decode_payload(b"4hello\x1ebAQIDBA==", max_payload=100)
    assert packets == [
        engineio.Packet(engineio.PacketType.MESSAGE, "hello"),
        engineio.Packet(engineio.PacketType.MESSAGE, b"\x01\x02\x03\x04"),
    ]
    assert engineio.encode_payload(["4hello", b"\x01\x02\x03\x04"]) == "4hello\x1ebAQIDBA=="


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"abc", EngineIOError, "unknown packet type"),
        (b"\xff\xfe", EngineIOError, "utf-8"),
        (b"b!!!", EngineIOError, "base64"),
        ("bé".encode(), EngineIOError, "base64"),  # not ASCII: found by test_fuzz_decoders
        (b"4" * 101, PayloadTooLargeError, "exceeds"),
        (b"4a\x1e", EngineIOError, "empty packet"),
    ],
)
def test_polling_payload_errors(body: bytes, error: type[Exception], words: str) -> None:
    """Bad polling bodies are refused with a reason."""
    with pytest.raises(error, match=words):
        engineio.decode_payload(body, max_payload=100)


@given(
    st.lists(
        st.text(max_size=10).map(lambda s: "4" + s.replace("\x1e", "")) | st.binary(max_size=10),
        min_size=1,
        max_size=5,
    )
)
def test_payload_round_trip(packets: list[str | bytes]) -> None:
    """Any list of text and binary packets survives a polling payload round trip."""
    encoded = engineio.encode_payload(packets).encode()
    decoded = engineio.decode_payload(encoded, max_payload=10_000)
    assert [p.serialize() for p in decoded] == packets
