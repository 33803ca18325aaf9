"""Event schemas: client events, publications and stream entries checked against JSON Schema."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from conftest import http_json
from prometheus_client.parser import text_string_to_metric_families

import redis_fixtures
from roomcast import Application, Socket
from roomcast.node import load_schemas
from roomcast.publisher import Publisher
from roomcast.schemas import (
    DRAFT_07,
    EventSchema,
    EventSchemas,
    InvalidPayloadError,
    Issue,
    SchemaError,
    payload_of,
)
from wire import settings

if TYPE_CHECKING:
    from conftest import Mint, NodeScripts, RoomcastServer, ServerFactory

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix

CHAT = {
    "type": "object",
    "required": ["text"],
    "additionalProperties": False,
    "properties": {"text": {"type": "string", "maxLength": 50}},
}
NOTE = {
    "type": "object",
    "required": ["text"],
    "properties": {"text": {"type": "string"}},
}
SCHEMAS = {"chat": CHAT, "note": NOTE}


# --------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    ("payload", "issues"),
    [
        ({"text": "hi"}, None),
        ({"text": 5}, [Issue("/text", "must be string")]),
        ({}, [Issue("", "must contain ['text'] properties")]),
        ("hi", [Issue("", "must be object")]),
        ({"text": "x" * 51}, [Issue("/text", "must be shorter than or equal to 50 characters")]),
        ({"text": "a", "b": 1}, [Issue("", "must not contain {'b'} properties")]),
    ],
)
def test_issues_name_the_failing_path(payload: Any, issues: list[Issue] | None) -> None:
    """A payload that fails gets the JSON Pointer of the failing place and why."""
    assert EventSchema("chat", CHAT).issues(payload) == issues


def test_paths_are_json_pointers() -> None:
    """Array indices and keys with '/' or '~' are written as RFC 6901 pointers."""
    schema = EventSchema(
        "e",
        {
            "type": "object",
            "properties": {"a/b~c": {"type": "array", "items": {"type": "integer"}}},
        },
    )
    assert schema.issues({"a/b~c": [1, 2, "x"]}) == [Issue("/a~1b~0c/2", "must be integer")]


def test_a_check_never_changes_the_payload() -> None:
    """'default' in a schema is not written into the payload a check is given."""
    schema = EventSchema(
        "e", {"type": "object", "properties": {"n": {"type": "integer", "default": 3}}}
    )
    payload: dict[str, Any] = {}
    assert schema.issues(payload) is None
    assert payload == {}


def test_the_payload_is_the_one_argument_or_the_array() -> None:
    """One argument is the payload itself; none or several are checked as an array."""
    assert payload_of([{"a": 1}]) == {"a": 1}
    assert payload_of([]) == []
    assert payload_of([1, 2]) == [1, 2]


def test_invalid_payload_error_names_event_path_and_reason() -> None:
    """The error's message and details say which event, where and why."""
    with pytest.raises(InvalidPayloadError) as info:
        EventSchemas(SCHEMAS).check("chat", {"text": 1})
    assert str(info.value) == "payload of event 'chat' is invalid at /text: must be string"
    assert info.value.detail_dicts() == [{"path": "/text", "message": "must be string"}]
    EventSchemas(SCHEMAS).check("other", {"text": 1})  # no schema: anything goes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "is not JSON"),
        (b"[]", "must hold one JSON object"),
        (b'{"chat": 5}', "schema of event 'chat' must be a JSON object or a boolean"),
        (b'{"chat": {"type": "bogus"}}', "schema of event 'chat' is not usable"),
        (b'{"chat": {"$ref": "https://example.com/s.json"}}', "refers outside itself"),
        (b'{"chat": {"$ref": "data:application/json,{}"}}', "refers outside itself"),
        (
            b'{"chat": {"$schema": "https://json-schema.org/draft/2020-12/schema"}}',
            "event schemas are JSON Schema draft-07",
        ),
        (b'{"": {}}', "non-empty strings"),
    ],
)
def test_a_bad_schema_file_is_refused_naming_file_and_event(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """Loading fails with a message that names the file and, where it can, the event."""
    path = tmp_path / "schemas.json"
    path.write_bytes(content)
    with pytest.raises(SchemaError, match=message) as info:
        EventSchemas.load(str(path))
    assert str(path) in str(info.value)


def test_a_schema_file_loads_with_draft_07_and_local_refs(tmp_path: Path) -> None:
    """Draft-07, booleans and local $refs are fine; a missing file names its path."""
    path = tmp_path / "schemas.json"
    path.write_text(
        json.dumps(
            {
                "any": True,
                "point": {
                    "$schema": DRAFT_07,
                    "definitions": {"n": {"type": "number"}},
                    "type": "object",
                    "properties": {"x": {"$ref": "#/definitions/n"}},
                },
            }
        )
    )
    schemas = EventSchemas.load(str(path))
    assert sorted(schemas) == ["any", "point"]
    assert schemas.issues("point", {"x": "1"}) == [Issue("/x", "must be number")]
    assert schemas.issues("any", object()) is None
    with pytest.raises(SchemaError, match="cannot read event_schemas file"):
        EventSchemas.load(str(tmp_path / "missing.json"))


def test_an_app_schema_is_compiled_when_registered() -> None:
    """@app.on(schema=...) compiles at once; a bad schema fails there, naming the event."""
    app = Application()
    with pytest.raises(SchemaError, match="'bad'"):

        @app.on("bad", schema={"type": 5})
        async def bad(socket: Socket, data: Any) -> None: ...

    @app.on("good", schema=CHAT)
    async def good(socket: Socket, data: Any) -> None: ...

    registered = app.namespaces["/"].events["good"]
    assert registered.schema is not None and registered.schema.issues({"text": 1})


def test_an_event_with_a_schema_in_the_file_and_the_app_is_refused(tmp_path: Path) -> None:
    """Which of two schemas would win is not obvious: the node refuses to start."""
    path = tmp_path / "schemas.json"
    path.write_text(json.dumps(SCHEMAS))
    app = Application()

    @app.on("chat", schema=CHAT)
    async def chat(socket: Socket, data: Any) -> None: ...

    with pytest.raises(SchemaError, match="'chat' has a schema both in event_schemas"):
        load_schemas(settings(event_schemas=str(path)), app)


# --------------------------------------------------------------------------- the gateway


def _metrics(server: RoomcastServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _wait_for(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def _refused(ack: dict[str, Any], path: str, message: str) -> None:
    assert ack["ok"] is False, ack
    assert ack["error"]["code"] == "invalid_payload", ack
    assert ack["error"]["details"] == [{"path": path, "message": message}], ack
    assert ack["error"]["message"].startswith("payload of event "), ack


@pytest.mark.interop
@pytest.mark.redis
def test_invalid_payloads_never_reach_the_stream_a_handler_or_a_room(
    tmp_path: Path,
    roomcast_factory: ServerFactory,
    node_scripts: NodeScripts,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Through socket.io-client and a real redis-server: invalid client events (with an ack:
    invalid_payload and the failing path; without: dropped, counted, logged), invalid client
    and API publications, and invalid stream entries (raw XADD, a Publisher without schemas)
    are refused or skipped; the valid ones around them all arrive."""
    path = tmp_path / "schemas.json"
    path.write_text(json.dumps(SCHEMAS))
    server = roomcast_factory(
        "--allowed-origins",
        "*",
        "--redis-url",
        redis_url,
        "--redis-prefix",
        redis_prefix,
        "--event-schemas",
        str(path),
        "--upstream-events",
        "chat",
    )
    room = "doc:schemas"
    run = node_scripts.start(
        "schemas.mjs",
        {
            "url": server.url,
            "publisher": mint("alice", rooms=("doc:*",), publish=("doc:*",)),
            "reader": mint("bob", rooms=("doc:*",)),
            "room": room,
        },
    )
    run.wait_step("clients done")

    # Server side: the publish API, a raw XADD, a Publisher that does not check.
    status, body = server.publish(room, "note", {"text": 1})
    assert status == 400, body
    assert body["error"]["code"] == "invalid_payload"
    assert body["error"]["details"] == [{"path": "/text", "message": "must be string"}]
    assert server.publish(room, "note", {"text": "api ok"})[0] == 202
    status, body = http_json(
        "POST",
        f"{server.url}/api/v1/emit",
        {"room": room, "event": "note", "data": {"text": {}}, "timeout_ms": 100},
        {"Authorization": f"Bearer {server.credentials.api_key}"},
    )
    assert status == 400, body
    assert body["error"]["details"] == [{"path": "/text", "message": "must be string"}]
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = f"{redis_prefix}:room:{{{room}}}"
    try:
        raw.xadd(stream, {"room": room, "event": "note", "data": json.dumps({"text": None})})
        raw.xadd(stream, {"room": room, "event": "note", "data": json.dumps({"text": "raw ok"})})

        async def unchecked() -> None:
            publisher = Publisher.from_url(redis_url, prefix=redis_prefix)
            try:
                await publisher.publish(room, "note", {"text": False})
                await publisher.publish(room, "note", {"text": "publisher ok"})
            finally:
                await publisher.close()

        asyncio.run(unchecked())
        assert server.publish(room, "end", None)[0] == 202
        result = run.result()

        upstream = f"{redis_prefix}:upstream"
        _wait_for(lambda: raw.xlen(upstream) >= 3, "three upstream entries")
        entries = raw.xrange(upstream)
    finally:
        raw.close()

    assert result["joins"] == [{"ok": True}, {"ok": True}]
    chat = result["chat"]
    assert chat["valid"]["ok"] is True and chat["last"]["ok"] is True
    _refused(chat["invalid"], "/text", "must be string")
    _refused(chat["tooLong"], "/text", "must be shorter than or equal to 50 characters")
    _refused(chat["twoArgs"], "", "must be object")
    texts = sorted(json.loads(fields["data"])["text"] for _, fields in entries)
    assert texts == ["hi", "last", "no ack"]
    assert [fields["event"] for _, fields in entries] == ["chat"] * 3

    rename = result["rename"]
    assert rename["valid"] == [{"ok": True, "name": "Alice"}]
    assert rename["after"] == [{"ok": True, "name": "Bob"}]
    _refused(rename["invalid"][0], "/name", "must be longer than or equal to 1 characters")
    _refused(rename["wrongType"][0], "", "must be object")

    _refused(result["publish"]["invalid"], "/text", "must be string")
    assert result["publish"]["valid"]["ok"] is True
    notes = [e["data"]["text"] for e in result["bobEvents"] if e["event"] == "note"]
    assert notes == ["client ok", "api ok", "raw ok", "publisher ok"]
    assert result["bobEvents"][-1] == {"event": "end", "data": None}

    metrics = _metrics(server)
    assert metrics[("roomcast_dropped_messages_total", (("reason", "invalid_payload"),))] == 8
    invalid = {
        labels: value
        for (name, labels), value in metrics.items()
        if name == "roomcast_invalid_payloads_total"
    }
    assert invalid == {
        (("event", "chat"), ("source", "client_event")): 4,
        (("event", "rename"), ("source", "client_event")): 3,
        (("event", "note"), ("source", "client_publish")): 1,
        (("event", "note"), ("source", "api_publish")): 1,
        (("event", "note"), ("source", "api_emit")): 1,
    }
    dropped_entries = ("roomcast_broker_dropped_entries_total", (("reason", "invalid_payload"),))
    assert metrics[dropped_entries] == 2
    log = server.stderr()
    assert log.count("dropped message (invalid_payload)") == 8, log
    assert log.count("invalid_payload (payload of event 'note' is invalid at /text") == 2, log
