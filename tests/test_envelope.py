"""The envelope codec and key names: no Redis, no event loop."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from roomcast.auth import InvalidRoomError
from roomcast.broker.base import Publication
from roomcast.broker.envelope import (
    ATTACHMENT_FIELD,
    FIELDS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    EnvelopeError,
    decode_envelope,
    decode_feed,
    encode_envelope,
    encode_feed,
)
from roomcast.broker.keys import KeyNameError, Keys, keyspace_channel
from roomcast.protocol.socketio import RESERVED_EVENTS

SCHEMA_PATH = Path(__file__).parent.parent / "src/roomcast/broker/envelope.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _rule(name: str) -> dict[str, Any]:
    if name in SCHEMA["properties"]:
        rule: dict[str, Any] = SCHEMA["properties"][name]
        return rule
    for pattern, rule in SCHEMA["patternProperties"].items():
        if re.search(pattern, name):
            return rule  # type: ignore[no-any-return]
    return SCHEMA["additionalProperties"]  # type: ignore[no-any-return]


def schema_errors(instance: dict[str, Any]) -> list[str]:
    """The subset of JSON Schema the envelope schema uses: required, type, pattern, lengths,
    and raw bytes (a Redis value) where the schema says ``application/octet-stream``."""
    errors = [f"{name}: missing" for name in SCHEMA["required"] if name not in instance]
    for name, value in instance.items():
        rule = _rule(name)
        if isinstance(value, bytes) and rule.get("contentMediaType") == "application/octet-stream":
            continue
        if rule.get("type") == "string" and not isinstance(value, str):
            errors.append(f"{name}: not a string")
            continue
        if "pattern" in rule and re.search(rule["pattern"], value) is None:
            errors.append(f"{name}: does not match {rule['pattern']}")
        if len(value) < rule.get("minLength", 0) or len(value) > rule.get("maxLength", 1 << 30):
            errors.append(f"{name}: bad length {len(value)}")
    return errors


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
binary_values = st.recursive(
    json_values | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8).filter(lambda key: key != "_placeholder"), children, max_size=4
        )
    ),
    max_leaves=12,
)
rooms = st.from_regex(r"\A[A-Za-z0-9:_.@/-]{1,40}\Z")
publications = st.builds(
    Publication,
    room=rooms,
    event=st.text(min_size=1, max_size=30).filter(
        lambda e: e not in RESERVED_EVENTS and not e.startswith("roomcast:")
    ),
    data=binary_values,
    id=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    offset=st.just(""),
    idempotency_key=st.none() | st.text(min_size=1, max_size=40),
    traceparent=st.none() | st.just(TRACEPARENT),
    published_at_ms=st.integers(min_value=0, max_value=10**13),
    exclude_sid=st.none() | st.text(min_size=1, max_size=20),
    origin=st.none() | st.text(min_size=1, max_size=20),
)


def valid_fields() -> dict[str, str]:
    return {
        "room": "chat:1",
        "event": "message",
        "data": '{"text":"hi"}',
        "id": "abc",
        "published_at": "1700000000000",
    }


@given(publications)
def test_encode_then_decode_round_trips(publication: Publication) -> None:
    """Decoding an encoded publication gives it back, with the entry id as its offset."""
    fields = encode_envelope(publication)
    decoded = decode_envelope("1700000000000-7", fields, room=publication.room)
    assert decoded == Publication(
        **{**_as_dict(publication), "offset": "1700000000000-7"},
    )
    as_bytes = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    assert decode_envelope("1-0", as_bytes) == decode_envelope("1-0", fields)
    fed = decode_feed("1-0", encode_feed(fields), room=publication.topic)
    assert fed == decode_envelope("1-0", fields)


@given(publications)
def test_encoded_envelopes_validate_against_the_schema(publication: Publication) -> None:
    """Every encoded envelope satisfies envelope.schema.json."""
    assert schema_errors(encode_envelope(publication)) == []


def _as_dict(publication: Publication) -> dict[str, Any]:
    return {name: getattr(publication, name) for name in Publication.__slots__}


def test_schema_matches_the_codec() -> None:
    """The schema names the codec's fields, requires the required ones, and is draft 2020-12."""
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(SCHEMA["required"]) == set(REQUIRED_FIELDS)
    assert set(SCHEMA["properties"]) == set(FIELDS) == set(REQUIRED_FIELDS + OPTIONAL_FIELDS)
    assert list(SCHEMA["patternProperties"]) == [r"^attachment:(0|[1-9][0-9]{0,2})$"]
    assert re.search(next(iter(SCHEMA["patternProperties"])), ATTACHMENT_FIELD.format(255))
    assert all(rule.get("description") for rule in SCHEMA["properties"].values())
    assert schema_errors(valid_fields()) == []
    assert schema_errors({**valid_fields(), "published_at": "soon"}) != []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"room": None}, "room"),
        ({"event": None}, "event"),
        ({"data": None}, "data"),
        ({"namespace": "docs"}, "namespace"),
        ({"namespace": "/a#b"}, "namespace"),
        ({"event": ""}, "event"),
        ({"event": "e" * 257}, "event"),
        ({"data": "{not json"}, "data"),
        ({"data": ""}, "data"),
        ({"published_at": "-5"}, "published_at"),
        ({"published_at": "1.5"}, "published_at"),
        ({"id": ""}, "id"),
        ({"room": "bad room"}, "room"),
        ({"room": "a{b}"}, "room"),
        ({"traceparent": "nope"}, "traceparent"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"exclude_sid": ""}, "exclude_sid"),
    ],
)
def test_decode_errors_name_the_field(change: dict[str, str | None], field: str) -> None:
    """A missing or bad field raises EnvelopeError whose message starts with the field name."""
    fields = valid_fields()
    for name, value in change.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    with pytest.raises(EnvelopeError, match=rf"^{field}: "):
        decode_envelope("1-0", fields)


def test_decode_rejects_non_utf8_and_a_foreign_room() -> None:
    """Bytes that are not UTF-8, and a room other than the stream's, are errors."""
    raw = {k.encode(): v.encode() for k, v in valid_fields().items()}
    with pytest.raises(EnvelopeError, match=r"^data: not utf-8"):
        decode_envelope("1-0", {**raw, b"data": b"\xff"})
    with pytest.raises(
        EnvelopeError, match=r"^room: entry names 'chat:1' of namespace '/', stream is 'other'"
    ):
        decode_envelope("1-0", valid_fields(), room="other")


def test_decode_ignores_unknown_fields() -> None:
    """Fields this version does not know are ignored, so publishers may add their own."""
    publication = decode_envelope("5-1", {**valid_fields(), "x-tenant": "t1"})
    assert (publication.room, publication.data, publication.offset) == (
        "chat:1",
        {"text": "hi"},
        "5-1",
    )
    assert publication.idempotency_key is None and publication.traceparent is None


def test_encode_rejects_what_could_not_be_decoded() -> None:
    """Encoding refuses data that is not JSON, bad rooms and bad optional fields."""
    base = Publication(room="r", event="e", data=1, id="i", published_at_ms=1)
    with pytest.raises(EnvelopeError, match=r"^data: not json-serializable"):
        encode_envelope(Publication(room="r", event="e", data={1j}, id="i"))
    with pytest.raises(InvalidRoomError):
        encode_envelope(Publication(room="a b", event="e", data=1, id="i"))
    with pytest.raises(EnvelopeError, match=r"^traceparent"):
        encode_envelope(Publication(**{**_as_dict(base), "traceparent": "x"}))
    with pytest.raises(EnvelopeError, match=r"^published_at"):
        encode_envelope(Publication(**{**_as_dict(base), "published_at_ms": -1}))


def test_room_keys_share_one_cluster_slot() -> None:
    """A room's stream and idempotency keys hash to one slot: the room is the hash tag."""
    keys = Keys("rc")
    assert keys.room("chat:1") == "rc:room:{chat:1}"
    assert keys.idempotency("chat:1", "k{x}") == "rc:idem:{chat:1}:k{x}"
    assert key_slot(keys.room("chat:1").encode()) == key_slot(
        keys.idempotency("chat:1", "k{x}").encode()
    )
    assert keys.session("p1") == "rc:session:{p1}"
    assert keys.upstream() == "rc:upstream"
    assert Keys("rc", upstream="events").upstream() == "events"
    assert keyspace_channel(0, "rc:room:{a}") == "__keyspace@0__:rc:room:{a}"


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "with space", "x" * 65])
def test_bad_prefixes_are_rejected(prefix: str) -> None:
    """A prefix that could change the hash tag or the key layout is refused."""
    with pytest.raises(KeyNameError, match="invalid prefix"):
        Keys(prefix)


def test_session_ids_with_braces_are_rejected() -> None:
    """A session id must not carry its own hash tag."""
    with pytest.raises(KeyNameError, match="invalid session id"):
        Keys().session("a}b")


def test_feed_body_round_trips_and_rejects_what_is_not_an_object() -> None:
    """A feed message body carries the same fields as the entry, and decodes the same way."""
    publication = Publication(room="r", event="e", data={"a": [1, 2]}, id="p1", published_at_ms=5)
    body = encode_feed(encode_envelope(publication))
    decoded = decode_feed("7-1", body.encode(), room="r")
    assert (decoded.offset, decoded.data, decoded.id, decoded.published_at_ms) == (
        "7-1",
        {"a": [1, 2]},
        "p1",
        5,
    )
    with pytest.raises(EnvelopeError, match="feed: invalid json"):
        decode_feed("7-1", b"{nope", room="r")
    with pytest.raises(EnvelopeError, match="feed: not a json object"):
        decode_feed("7-1", b"[1]", room="r")
    with pytest.raises(EnvelopeError, match="room: entry names"):
        decode_feed("7-1", body, room="other")


def test_plain_xadd_fields_are_a_whole_envelope() -> None:
    """Without id and published_at, the entry id gives both (a domain service's plain XADD)."""
    publication = decode_envelope(
        "1700000000123-7", {b"room": b"r", b"event": b"e", b"data": b"{}"}, room="r"
    )
    assert publication.id == "1700000000123-7"
    assert publication.published_at_ms == 1700000000123
    assert publication.namespace == "/" and publication.topic == "r"


def test_namespace_round_trip_and_topic_check() -> None:
    """A namespaced publication keeps its namespace, and must come from its own topic's stream."""
    publication = Publication(
        room="1", namespace="/docs", event="e", data={"a": 1}, id="x", published_at_ms=5
    )
    fields = encode_envelope(publication)
    assert fields["namespace"] == "/docs"
    back = decode_envelope("5-0", fields, room="/docs#1")
    assert (back.namespace, back.room, back.topic) == ("/docs", "1", "/docs#1")
    with pytest.raises(EnvelopeError, match=r"^room: "):
        decode_envelope("5-0", fields, room="1")  # the main namespace's room 1 is another room
    main = encode_envelope(Publication(room="1", event="e", data=1, id="y"))
    assert "namespace" not in main
    with pytest.raises(EnvelopeError, match=r"^room: "):
        decode_envelope("5-0", main, room="/docs#1")


# --------------------------------------------------------------------------- binary data

ALL_BYTES = bytes(range(256))


@pytest.mark.parametrize(
    "data",
    [
        ALL_BYTES,
        b"",
        {"file": ALL_BYTES, "name": "a.bin", "parts": [b"\x00", {"deep": [b"\xff\xfe"]}]},
        [b"one", b"two", 3, None],
        {"same": [b"x", b"x"]},
    ],
)
def test_binary_data_round_trips_byte_for_byte(data: Any) -> None:
    """Bytes anywhere in the data come back as the same bytes, in the same places, from the
    entry's fields (as a Redis reply gives them) and from a feed message."""
    publication = Publication(room="r", event="e", data=data, id="p", published_at_ms=1)
    fields = encode_envelope(publication)
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    assert decode_envelope("1-0", raw, room="r").data == data
    assert decode_feed("1-0", encode_feed(fields).encode(), room="r").data == data
    assert schema_errors(fields) == []


def test_binary_entry_layout() -> None:
    """Placeholders in data, the count in attachments, each attachment's raw bytes in its own
    field; bytearray and memoryview are stored as bytes; JSON-only data has no such fields."""
    data = {"a": bytearray(b"\x00\x01"), "b": [memoryview(b"\xff")]}
    fields = encode_envelope(Publication(room="r", event="e", data=data, id="p"))
    assert json.loads(fields["data"]) == {
        "a": {"_placeholder": True, "num": 0},
        "b": [{"_placeholder": True, "num": 1}],
    }
    assert (fields["attachments"], fields["attachment:0"], fields["attachment:1"]) == (
        "2",
        b"\x00\x01",
        b"\xff",
    )
    assert decode_envelope("1-0", fields).data == {"a": b"\x00\x01", "b": [b"\xff"]}
    plain = encode_envelope(Publication(room="r", event="e", data={"a": 1}, id="p"))
    assert "attachments" not in plain
    assert not [name for name in plain if name.startswith("attachment:")]


def test_placeholders_mean_something_only_in_binary_entries() -> None:
    """An entry without attachments reads exactly as before: a placeholder-shaped object is
    plain JSON; and such an object beside bytes is refused when encoding, not misread later."""
    placeholder = {"_placeholder": True, "num": 0}
    entry = {b"room": b"r", b"event": b"e", b"data": json.dumps({"x": placeholder}).encode()}
    assert decode_envelope("1-0", entry).data == {"x": placeholder}
    assert encode_envelope(Publication(room="r", event="e", data=placeholder, id="p"))
    with pytest.raises(EnvelopeError, match="_placeholder"):
        encode_envelope(Publication(room="r", event="e", data=[placeholder, b"x"], id="p"))


def test_a_plain_xadd_with_an_attachment() -> None:
    """What another language's XADD writes (fields and values as bytes) is a binary entry."""
    entry = {
        b"room": b"r",
        b"event": b"file",
        b"data": b'{"name":"a","body":{"_placeholder":true,"num":0}}',
        b"attachments": b"1",
        b"attachment:0": b"\x89PNG\r\n\x1a\n\x00",
    }
    assert decode_envelope("5-0", entry, room="r").data == {
        "name": "a",
        "body": b"\x89PNG\r\n\x1a\n\x00",
    }


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({b"attachments": b"0"}, "attachments: not a count"),
        ({b"attachments": b"01"}, "attachments: not a count"),
        ({b"attachments": b"257"}, "attachments: not a count"),
        ({b"attachments": b"two"}, "attachments: not a count"),
        ({b"attachments": b"2"}, "attachment:1: missing"),
        ({b"data": b'[{"_placeholder":true,"num":1}]'}, "data: invalid attachment placeholder"),
        ({b"data": b'[{"_placeholder":true,"num":"0"}]'}, "data: invalid attachment placeholder"),
        ({b"data": b"[nope"}, "data: invalid json"),
    ],
)
def test_bad_binary_entries_are_refused(change: dict[bytes, bytes], words: str) -> None:
    """A binary entry whose count, attachments or placeholders disagree is malformed."""
    entry = {
        b"room": b"r",
        b"event": b"e",
        b"data": b'[{"_placeholder":true,"num":0}]',
        b"attachments": b"1",
        b"attachment:0": b"\x00",
        **change,
    }
    with pytest.raises(EnvelopeError, match=words):
        decode_envelope("1-0", entry)


def test_bad_binary_feed_messages_are_refused() -> None:
    """A feed message's attachment must be base64 text (the stream then has the entry)."""
    body = {"room": "r", "event": "e", "data": "[]", "attachments": "1"}
    with pytest.raises(EnvelopeError, match="attachment:0 is not base64"):
        decode_feed("1-0", json.dumps({**body, "attachment:0": "!!"}), room="r")
    with pytest.raises(EnvelopeError, match="attachment:0 must be base64 text"):
        decode_feed("1-0", json.dumps({**body, "attachment:0": 1}), room="r")


def test_data_that_is_neither_json_nor_bytes_is_refused() -> None:
    """Only JSON values and bytes: anything else names the data field."""
    with pytest.raises(EnvelopeError, match="data: not json-serializable"):
        encode_envelope(Publication(room="r", event="e", data=[b"x", object()], id="p"))
    with pytest.raises(EnvelopeError, match="data: more than 256"):
        encode_envelope(Publication(room="r", event="e", data=[b"x"] * 257, id="p"))
