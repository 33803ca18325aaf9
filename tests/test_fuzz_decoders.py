"""Property tests of every decoder of client or service input: whatever comes in, the only
exception is the codec's own (a clear, counted refusal), never a crash of another kind."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.broker.envelope import EnvelopeError, decode_envelope, decode_feed
from roomcast.protocol import engineio
from roomcast.protocol.errors import ProtocolError
from roomcast.protocol.socketio import Decoder, Limits

FUZZ = settings(max_examples=400, deadline=None)

# Text shaped like Socket.IO packets: type digits, counts, namespaces, ids, JSON and placeholders.
_SIO_PIECES = st.sampled_from(
    ["0", "1", "2", "3", "4", "5", "6", "7", "-", "/", ",", "[", "]", "{", "}", '"', ":", "e",
     '"_placeholder"', "true", '"num"', "9" * 50, "1" * 5000, "\x00", "é", "null", "1e999"]
)  # fmt: skip
sio_text = st.lists(_SIO_PIECES, max_size=12).map("".join) | st.text(max_size=60)


@FUZZ
@given(st.text(max_size=60) | st.binary(max_size=60))
def test_engineio_packets_parse_or_refuse(raw: str | bytes) -> None:
    """Any WebSocket message is an Engine.IO packet or an EngineIOError."""
    with contextlib.suppress(ProtocolError):
        engineio.Packet.parse(raw)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_polling_payloads_decode_or_refuse(body: bytes) -> None:
    """Any polling POST body decodes to packets or is refused with a ProtocolError."""
    with contextlib.suppress(ProtocolError):
        engineio.decode_payload(body, max_payload=150)


@FUZZ
@given(st.lists(sio_text | st.binary(max_size=20), min_size=1, max_size=6))
def test_socketio_decoder_accepts_or_refuses(messages: list[str | bytes]) -> None:
    """A sequence of Socket.IO messages (text packets and binary attachments, in any order)
    gives packets or a ProtocolError: never another exception."""
    decoder = Decoder(Limits(max_attachments=10, max_nesting=8))
    for message in messages:
        try:
            decoder.feed(message)
        except ProtocolError:
            return


_FIELD_NAMES = st.sampled_from(
    ["room", "event", "data", "id", "published_at", "idempotency_key", "traceparent",
     "exclude_sid", "origin", "other"]
)  # fmt: skip
_FIELD_VALUES = st.text(max_size=30) | st.sampled_from(
    ["chat:1", "{}", "[1]", "1700000000000", "disconnect", "roomcast:x", "{bad", "9" * 30]
)


@FUZZ
@given(
    st.dictionaries(_FIELD_NAMES, _FIELD_VALUES, max_size=10),
    st.booleans(),
)
def test_envelopes_decode_or_refuse(fields: dict[str, str], as_bytes: bool) -> None:
    """Any stream entry a service XADDs decodes to a publication or an EnvelopeError."""
    raw: dict[str, str] | dict[bytes, bytes] = (
        {k.encode(): v.encode() for k, v in fields.items()} if as_bytes else fields
    )
    with contextlib.suppress(EnvelopeError):
        decode_envelope("1-0", raw)


@FUZZ
@given(st.binary(max_size=100) | st.text(max_size=100))
def test_feed_messages_decode_or_refuse(body: bytes | str) -> None:
    """Any feed message body decodes or is an EnvelopeError."""
    with contextlib.suppress(EnvelopeError):
        decode_feed("1-0", body, room="chat:1")
