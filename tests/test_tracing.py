"""OpenTelemetry traces: from a publisher's W3C traceparent to the fan-out on every instance.

The end-to-end tests start real instances on a real redis-server with the ``OTEL_*`` variables
pointing at an OTLP/HTTP receiver the test runs (``otlp_receiver.py``), and check the spans the
instances export: ids, parent links and attributes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import TYPE_CHECKING, cast

import multi_fixtures
import otlp_receiver
import pytest
import redis
from conftest import http_json
from multi_fixtures import redis_args, room_key
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from otlp_receiver import OtlpReceiver, ReceivedSpan

import redis_fixtures
import roomcast.tracing
from roomcast.broker.base import BrokerUnavailableError, Publication, PublishRequest, PublishResult
from roomcast.broker.envelope import EnvelopeError
from roomcast.broker.memory import MemoryBroker
from roomcast.config import ConfigError
from roomcast.http.routes import header_traceparent
from roomcast.publisher import Publisher
from roomcast.tracing import Tracing, wanted

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Mint, RoomcastServer
    from multi_fixtures import GatewayFactory, NodeClients

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients
otlp_receiver_fixture = otlp_receiver.otlp_receiver

ROOMS = ("tr:**",)


def _traceparent(*, sampled: bool = True) -> tuple[str, str, str]:
    """A fresh W3C traceparent: (header value, trace id, parent span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def _named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


def _fanned_out(count: int) -> Callable[[list[ReceivedSpan]], bool]:
    return lambda spans: len(_named(spans, "roomcast fanout")) >= count


def _check_delivery(
    spans: list[ReceivedSpan], parent: str, room: str, instances: set[str], members: int
) -> None:
    """One ``roomcast receive`` span per instance, a child of ``parent``, and under each one
    ``roomcast fanout`` span that sent to ``members`` sockets of ``room`` (of namespace /)."""
    receives = _named(spans, "roomcast receive")
    fanouts = _named(spans, "roomcast fanout")
    assert {r.attributes["roomcast.instance"] for r in receives} == instances, receives
    assert len(receives) == len(instances) == len(fanouts), spans
    by_instance = {r.attributes["roomcast.instance"]: r for r in receives}
    for receive in receives:
        assert receive.parent == parent, receive
        assert receive.kind == "SPAN_KIND_CONSUMER", receive
        assert receive.attributes["messaging.destination.name"] == room, receive
        assert receive.start_ns <= receive.end_ns, receive
    for fanout in fanouts:
        receive = by_instance[fanout.attributes["roomcast.instance"]]
        assert fanout.parent == receive.span_id, (fanout, receive)
        assert fanout.attributes["roomcast.room"] == room, fanout
        assert fanout.attributes["roomcast.namespace"] == "/", fanout
        assert fanout.attributes["roomcast.members"] == members, fanout
    assert len({r.attributes["messaging.message.id"] for r in receives}) == 1, receives


def _instances(server: RoomcastServer, room: str) -> dict[str, str]:
    """Socket id -> instance id, for the sockets of ``room`` (the server API)."""
    status, body = http_json(
        "GET",
        f"{server.url}/api/v1/sockets?room={room}",
        headers={"Authorization": f"Bearer {server.credentials.api_key}"},
    )
    assert status == 200, (status, body)
    return {s["id"]: s["instance"] for s in body["sockets"]}


@pytest.mark.redis
@pytest.mark.interop
def test_spans_link_a_publisher_to_the_fan_out_on_two_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
    otlp_receiver_fixture: OtlpReceiver,
) -> None:
    """A traceparent header on the publish API, or a traceparent field of a raw XADD, continues as spans on both instances (publish, then a receive and a fan-out per instance, each the parent of the next), one not sampled makes none, and an upstream client event is a span whose context its stream entry carries."""
    receiver = otlp_receiver_fixture
    servers = gateways(2, *redis_args(redis_url, redis_prefix, "--upstream-events", "note"))
    room = "tr:room:1"
    ids = {}
    for name, server in (("a", servers[0]), ("b", servers[1])):
        ids[name] = node_clients.connect(name, server.url, mint(f"user-{name}", rooms=ROOMS))["id"]
        node_clients.join(name, room)
    instances = _instances(servers[0], room)
    assert set(instances) == set(ids.values()) and len(set(instances.values())) == 2, instances
    both = set(instances.values())

    api = {"Authorization": f"Bearer {servers[0].credentials.api_key}"}
    # 0. not sampled: no spans anywhere (the next publication is the marker: each instance
    # delivers, and exports, a room's publications in order)
    header, quiet_trace, _ = _traceparent(sampled=False)
    status, body = http_json(
        "POST",
        f"{servers[0].url}/api/v1/publish",
        {"room": room, "event": "quiet", "data": {"n": 0}},
        {**api, "traceparent": header},
    )
    assert status == 202, (status, body)

    # 1. the publish API, with a W3C traceparent header
    header, trace_id, caller = _traceparent()
    status, body = http_json(
        "POST",
        f"{servers[0].url}/api/v1/publish",
        {"room": room, "event": "hello", "data": {"n": 1}},
        {**api, "traceparent": header},
    )
    assert status == 202, (status, body)
    for name in ("a", "b"):
        assert [e["data"] for e in node_clients.wait_events(name, 2)] == [{"n": 0}, {"n": 1}]
    spans = receiver.wait(_fanned_out(2), trace_id=trace_id, what="two fan-out spans")
    assert receiver.trace(quiet_trace) == []
    [publish] = _named(spans, "roomcast publish")
    assert publish.parent == caller, publish
    assert publish.kind == "SPAN_KIND_PRODUCER", publish
    assert publish.service == "roomcast-test", publish
    assert publish.attributes["roomcast.room"] == room, publish
    assert publish.attributes["roomcast.source"] == "http", publish
    assert publish.attributes["roomcast.instance"] == instances[ids["a"]], publish
    assert publish.attributes["messaging.message.id"] == body["id"], publish
    _check_delivery(spans, publish.span_id, room, both, members=1)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = cast(
            "list[tuple[str, dict[str, str]]]",
            raw.xrange(room_key(redis_prefix, room), body["offset"], body["offset"]),
        )
        # the envelope carries the publish span's context, not the caller's
        assert entries[0][1]["traceparent"] == f"00-{trace_id}-{publish.span_id}-01", entries

        # 2. a raw XADD of an envelope with a traceparent field
        header, trace_id, caller = _traceparent()
        raw.xadd(
            room_key(redis_prefix, room),
            {"room": room, "event": "hello", "data": '{"n": 2}', "traceparent": header},
        )
        for name in ("a", "b"):
            assert [e["data"] for e in node_clients.wait_events(name, 3)][2] == {"n": 2}
        spans = receiver.wait(_fanned_out(2), trace_id=trace_id, what="two fan-out spans")
        assert _named(spans, "roomcast publish") == [], spans
        _check_delivery(spans, caller, room, both, members=1)

        # 3. an upstream client event
        [ack] = node_clients.emit("b", "note", {"text": "hi"})
        assert ack["ok"] is True, ack
        upstream = cast(
            "list[tuple[str, dict[str, str]]]",
            raw.xrange(f"{redis_prefix}:upstream", ack["id"], ack["id"]),
        )
    finally:
        raw.close()
    fields = upstream[0][1]
    _, trace_id, span_id, _ = fields["traceparent"].split("-")
    spans = receiver.wait(
        lambda spans: bool(_named(spans, "roomcast upstream")),
        trace_id=trace_id,
        what="an upstream span",
    )
    [span] = spans
    assert (span.name, span.span_id, span.parent) == ("roomcast upstream", span_id, ""), span
    assert span.kind == "SPAN_KIND_PRODUCER", span
    assert span.attributes["roomcast.event"] == "note", span
    assert span.attributes["roomcast.socket"] == ids["b"] == fields["sid"], span
    assert span.attributes["roomcast.user"] == "user-b", span
    assert span.attributes["roomcast.instance"] == instances[ids["b"]], span
    assert span.attributes["messaging.message.id"] == ack["id"], span


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    return subprocess.run(
        [sys.executable, "-m", "roomcast", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.redis
@pytest.mark.interop
def test_the_cli_and_the_publisher_continue_a_traceparent(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
    otlp_receiver_fixture: OtlpReceiver,
) -> None:
    """`roomcast publish --traceparent` through the HTTP API (the body field) and through Redis (a Publisher, whose span the CLI exports itself) each continue the given trace down to the fan-out."""
    receiver = otlp_receiver_fixture
    [server] = gateways(1, *redis_args(redis_url, redis_prefix))
    room = "tr:cli:1"
    node_clients.connect("c", server.url, mint("user-c", rooms=ROOMS))
    node_clients.join("c", room)
    [instance] = set(_instances(server, room).values())
    common = ("publish", "--room", room, "--event", "hello")

    header, trace_id, caller = _traceparent()
    key = ("--api-key", server.credentials.api_key, "--url", server.url)
    done = _cli(*common, "--data", '{"via": "http"}', "--traceparent", header, *key)
    assert done.returncode == 0, done.stderr
    spans = receiver.wait(_fanned_out(1), trace_id=trace_id, what="a fan-out span")
    [publish] = _named(spans, "roomcast publish")
    assert (publish.parent, publish.attributes["roomcast.source"]) == (caller, "http"), publish
    _check_delivery(spans, publish.span_id, room, {instance}, members=1)

    header, trace_id, caller = _traceparent()
    redis_flags = ("--redis-url", redis_url, "--redis-prefix", redis_prefix)
    done = _cli(*common, "--data", '{"via": "redis"}', "--traceparent", header, *redis_flags)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    spans = receiver.wait(_fanned_out(1), trace_id=trace_id, what="a fan-out span")
    [publish] = _named(spans, "roomcast publish")
    assert publish.parent == caller, publish
    assert publish.attributes["roomcast.source"] == "publisher", publish
    assert publish.attributes["roomcast.instance"] != instance, "the CLI is not the gateway"
    assert publish.attributes["messaging.message.id"] == result["id"], publish
    _check_delivery(spans, publish.span_id, room, {instance}, members=1)
    events = node_clients.wait_events("c", 2)
    assert [e["data"] for e in events] == [{"via": "http"}, {"via": "redis"}]


@pytest.mark.parametrize(
    ("mode", "environ", "on"),
    [
        ("auto", {}, False),
        ("off", {}, False),
        ("on", {}, True),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ("auto", {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ("off", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ("auto", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, False),
        ("auto", {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, False),
        ("on", {"OTEL_SDK_DISABLED": "TRUE"}, False),
        (
            "auto",
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_EXPORTER": "otlp"},
            True,
        ),
    ],
)
def test_tracing_is_on_only_when_asked_for(mode: str, environ: dict[str, str], on: bool) -> None:
    """The tracing setting and the standard OTEL_* variables decide whether tracing is on."""
    assert wanted(mode, environ) is on


@pytest.mark.parametrize(
    ("mode", "environ", "named"),
    [
        ("sometimes", {}, "tracing"),
        ("auto", {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ("on", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        (
            "auto",
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_tracing_refuses_what_it_cannot_do(mode: str, environ: dict[str, str], named: str) -> None:
    """A tracing mode, exporter or protocol Roomcast does not have is a configuration error naming it."""
    with pytest.raises(ConfigError, match=rf"^{named}"):
        wanted(mode, environ)


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        (" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00 ", True),
        ("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01", False),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", False),
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01, "
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203332-01",
            False,
        ),
    ],
)
def test_a_bad_traceparent_header_is_ignored(value: str, kept: bool) -> None:
    """The publish API keeps a valid W3C traceparent header and ignores an invalid one (upper-case, zero ids, version ff, repeated)."""
    assert header_traceparent(value) == (value.strip() if kept else None)


def test_without_tracing_opentelemetry_is_never_imported() -> None:
    """With tracing off, a node, the publish path and the CLI's modules never import opentelemetry (it is an optional extra)."""
    code = (
        "import asyncio, socket, sys\n"
        "from roomcast import cli, publisher, tracing\n"
        "from roomcast.broker.base import PublishRequest\n"
        "from roomcast.config import load\n"
        "from roomcast.node import Node\n"
        "async def main():\n"
        "    node = Node(load({}, environ={}))\n"
        "    sock = socket.socket()\n"
        "    sock.bind(('127.0.0.1', 0))\n"
        "    await node.start(sock)\n"
        "    await node.publish(PublishRequest(room='r', event='e', data=1))\n"
        "    await node.stop()\n"
        "    assert node.tracing is None and tracing.active is None\n"
        "asyncio.run(main())\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry')\n"
        "print(loaded)\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and not k.startswith("ROOMCAST_")
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_check_config_refuses_an_exporter_it_does_not_have() -> None:
    """`roomcast check-config` exits 2 naming OTEL_TRACES_EXPORTER when it asks for an exporter other than otlp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    done = subprocess.run(
        [sys.executable, "-m", "roomcast", "check-config"],
        capture_output=True,
        text=True,
        env={**env, "OTEL_TRACES_EXPORTER": "zipkin"},
        timeout=60,
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "OTEL_TRACES_EXPORTER" in done.stderr, done.stderr


# --------------------------------------------------------------------------- in one process
# The spans themselves, with the real SDK and its in-memory exporter (no global provider).


def _sdk() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


async def test_a_publish_span_is_the_parent_the_envelope_carries() -> None:
    """The publish span is a child of the request's traceparent, the publication carries the publish span's own context, and the delivery spans hang under it."""
    tracing, exporter = _sdk()
    broker = MemoryBroker()
    got: list[Publication] = []
    await broker.start(tracing.delivery(lambda p: got.append(p) or 3, "inst-1"))
    await broker.subscribe("r")
    header, trace_id, caller = _traceparent()
    result = await tracing.publish(
        broker.publish,
        PublishRequest(room="r", event="e", data=1, traceparent=header),
        source="http",
        instance="inst-1",
    )
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert sorted(spans) == ["roomcast fanout", "roomcast publish", "roomcast receive"]
    publish, receive = spans["roomcast publish"], spans["roomcast receive"]
    fanout = spans["roomcast fanout"]
    assert publish.parent is not None and f"{publish.parent.span_id:016x}" == caller
    assert f"{publish.context.trace_id:032x}" == trace_id
    assert got[0].traceparent == f"00-{trace_id}-{publish.context.span_id:016x}-01"
    assert receive.parent is not None and receive.parent.span_id == publish.context.span_id
    assert fanout.parent is not None and fanout.parent.span_id == receive.context.span_id
    assert publish.attributes is not None and fanout.attributes is not None
    assert publish.attributes["messaging.message.id"] == result.id
    assert fanout.attributes["roomcast.members"] == 3
    await broker.stop()


async def test_a_failed_publish_is_an_error_span() -> None:
    """A publish the broker refuses reaches the caller unchanged, and its span ends with an error status and the exception recorded."""
    tracing, exporter = _sdk()

    async def refuse(request: PublishRequest) -> PublishResult:
        raise BrokerUnavailableError("redis is down")

    with pytest.raises(BrokerUnavailableError, match="redis is down"):
        await tracing.publish(
            refuse, PublishRequest(room="r", event="e", data=1), source="http", instance="i"
        )
    [span] = exporter.get_finished_spans()
    assert span.parent is None  # no traceparent, no current span: a new trace
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


def test_a_publication_without_traceparent_makes_no_span() -> None:
    """A publication with no traceparent (a plain XADD without one) is delivered with no span."""
    tracing, exporter = _sdk()
    sent: list[Publication] = []
    deliver = tracing.delivery(lambda p: sent.append(p) or 1, "inst-1")
    publication = Publication(room="r", event="e", data=1, id="p1", offset="1-0")
    deliver(publication)
    assert sent == [publication]
    assert exporter.get_finished_spans() == ()


async def test_a_publisher_in_a_traced_service_continues_its_current_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After roomcast.tracing.enable(provider), a Publisher's publish is a span under the caller's current span, and its envelope carries it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(roomcast.tracing, "active", None)  # restored after the test
    roomcast.tracing.enable(provider)
    broker = MemoryBroker()
    got: list[Publication] = []
    await broker.start(got.append)
    await broker.subscribe("r")
    with provider.get_tracer("service").start_as_current_span("handle request") as caller:
        await Publisher(broker).publish("r", "e", {"n": 1})
    spans = {span.name: span for span in exporter.get_finished_spans()}
    publish = spans["roomcast publish"]
    assert publish.parent is not None
    assert publish.parent.span_id == caller.get_span_context().span_id
    assert publish.attributes is not None and publish.attributes["roomcast.source"] == "publisher"
    assert got[0].traceparent is not None
    _, trace_id, span_id, flags = got[0].traceparent.split("-")
    assert (trace_id, span_id) == (
        f"{publish.context.trace_id:032x}",
        f"{publish.context.span_id:016x}",
    )
    assert int(flags, 16) & 1, "sampled"
    await broker.stop()


async def test_a_publisher_refuses_a_bad_traceparent_with_tracing_on_or_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Publisher refuses a traceparent that is not W3C (naming the field) whether tracing is on or off, and stores nothing."""
    broker = MemoryBroker()
    got: list[Publication] = []
    await broker.start(got.append)
    await broker.subscribe("r")
    for tracing in (None, _sdk()[0]):  # restored after the test
        monkeypatch.setattr(roomcast.tracing, "active", tracing)
        with pytest.raises(EnvelopeError, match=r"^traceparent"):
            await Publisher(broker).publish("r", "e", 1, traceparent="00-abc-def-01")
    assert got == []
    await broker.stop()
