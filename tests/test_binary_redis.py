"""Binary publications on Redis: the envelope's attachment fields in real streams, the feed,
history, a binary ``XADD`` from redis-cli, and two ``roomcast serve`` instances on one Redis with
the official client (either parser), recovery on the other instance included."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import multi_fixtures
import pytest
import redis.asyncio as aioredis
from multi_fixtures import publish_ok, redis_args

import redis_fixtures
from redis_fixtures import Deliveries, require_binary
from roomcast.broker.base import PublishRequest
from roomcast.broker.keys import Keys
from roomcast.broker.redis import RedisBroker
from roomcast.publisher import Publisher

if TYPE_CHECKING:
    from conftest import Mint
    from multi_fixtures import GatewayFactory, NodeClients, ProxyFactory

pytestmark = pytest.mark.redis

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
redis_cluster_url = redis_fixtures.redis_cluster_url
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients
tcp_proxy = multi_fixtures.tcp_proxy

ALL_BYTES = bytes(range(256))


@pytest.fixture
async def brokers(redis_url: str, redis_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[RedisBroker] = []

    async def start() -> tuple[RedisBroker, Deliveries]:
        broker = RedisBroker(redis_url, prefix=redis_prefix)
        deliveries = Deliveries()
        await broker.start(deliveries)
        started.append(broker)
        return broker, deliveries

    yield start
    for broker in started:
        await broker.stop()


async def test_binary_publications_in_streams_feed_and_history(
    brokers: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    """A binary publication is one stream entry with its bytes in raw attachment fields; the
    other instance gets it from the feed message (no stream read), and history returns it,
    byte for byte."""
    first, first_got = await brokers()
    second, second_got = await brokers()
    for broker in (first, second):
        await broker.subscribe("bin")
    await first.publish(PublishRequest("bin", "e", "warm-up"))  # after the catch-up read
    for got in (first_got, second_got):
        await got.wait_for(1)
    fed_before = second.fed
    data = {"name": "a.bin", "parts": [ALL_BYTES, b"", ALL_BYTES[::-1]]}
    result = await first.publish(PublishRequest("bin", "file", data))
    for got in (first_got, second_got):
        await got.wait_for(2)
        assert got.publications[1].data == data
    assert second.fed == fed_before + 1, "the binary entry came with its feed message"
    raw = aioredis.Redis.from_url(redis_url)
    try:
        ((_, fields),) = await raw.xrange(
            Keys(redis_prefix).room("bin"), result.offset, result.offset
        )
    finally:
        await raw.aclose()
    assert fields[b"attachments"] == b"3"
    assert [fields[f"attachment:{n}".encode()] for n in range(3)] == data["parts"]
    assert json.loads(fields[b"data"])["parts"][0] == {"_placeholder": True, "num": 0}
    history = await second.history("bin", "0")
    assert [p.data for p in history.publications] == ["warm-up", data]


async def test_binary_xadd_from_redis_cli_and_a_malformed_one(
    brokers: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    """``redis-cli -x XADD ... attachments 1 attachment:0`` with the bytes on stdin, as a
    service in another language would write it, is delivered byte for byte; an entry whose
    attachment is missing is counted as malformed and skipped, and the next one still comes."""
    cli = require_binary("redis-cli")
    broker, got = await brokers()
    await broker.subscribe("cli")
    parsed = urllib.parse.urlparse(redis_url)
    key = Keys(redis_prefix).room("cli")
    head = [cli, "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port)]
    body = '{"name":"x.bin","body":{"_placeholder":true,"num":0}}'
    fields = ["room", "cli", "event", "file", "data", body, "attachments"]

    def xadd(count: str, *rest: str, stdin: bytes | None = None) -> None:
        args = [*head, *(["-x"] if stdin is not None else []), "XADD", key, "*"]
        subprocess.run([*args, *fields, count, *rest], input=stdin, check=True, capture_output=True)

    await asyncio.to_thread(xadd, "2", "attachment:0", "x")  # attachment:1 is missing
    await asyncio.to_thread(xadd, "1", "attachment:0", stdin=ALL_BYTES)
    await got.wait_for(1)
    assert got.publications[0].data == {"name": "x.bin", "body": ALL_BYTES}
    assert broker.dropped["malformed_envelope"] == 1


async def test_publisher_bytes(
    brokers: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    """``Publisher.from_url`` publishes bytes (bytearray and memoryview too) as attachments."""
    broker, got = await brokers()
    await broker.subscribe("pub")
    publisher = Publisher.from_url(redis_url, prefix=redis_prefix)
    try:
        await publisher.publish("pub", "file", [bytearray(b"\x00a"), memoryview(b"\xffb")])
    finally:
        await publisher.close()
    await got.wait_for(1)
    assert got.publications[0].data == [b"\x00a", b"\xffb"]


def _blob(salt: str) -> bytes:
    return ALL_BYTES + salt.encode()


def _described(data: bytes) -> dict[str, str]:
    return {"binary": "Buffer", "hex": data.hex()}


@pytest.mark.interop
@pytest.mark.parametrize("parser", ["json", "msgpack"])
def test_binary_across_two_instances_and_recovery_on_the_other(
    parser: str,
    gateways: GatewayFactory,
    node_clients: NodeClients,
    tcp_proxy: ProxyFactory,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Two instances on one Redis, official clients (with the JSON or the msgpack parser) on
    each: a ``$binary`` publication on one instance reaches members on both as Buffers, byte
    for byte; a client cut off from A recovers on B and gets the binary publications it
    missed, byte for byte, with the same socket id."""
    a, b = gateways(2, *redis_args(redis_url, redis_prefix), "--parser", parser)
    room = "mi:bin:r"
    rooms = ("mi:**",)
    proxy = tcp_proxy(a.port)
    reconnecting = {
        "transports": ["websocket"],
        "reconnection": True,
        "reconnectionDelay": 50,
        "reconnectionDelayMax": 200,
        "randomizationFactor": 0,
        "parser": parser,
    }
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=rooms), **reconnecting)
    node_clients.connect("stay", b.url, mint("stay", rooms=rooms), parser=parser)
    for name in ("roamer", "stay"):
        node_clients.join(name, room)

    def binary(data: bytes) -> dict[str, str]:
        return {"$binary": base64.b64encode(data).decode()}

    live = publish_ok(a, room, "file", {"body": binary(_blob("live"))})
    for name in ("roamer", "stay"):
        (event,) = node_clients.wait_events(name, 1)
        assert (event["data"], event["offset"]) == (
            {"body": _described(_blob("live"))},
            live["offset"],
        )

    proxy.pause()
    proxy.drop_all()
    node_clients.wait_disconnects("roamer", 1)
    proxy.retarget(b.port)
    missed = [publish_ok(b, room, "missed", binary(_blob(f"m{n}")))["offset"] for n in range(3)]
    proxy.resume()
    again = node_clients.wait_connects("roamer", 2)[-1]
    assert again["recovered"] is True and again["id"] == first["id"], (first, again)
    publish_ok(b, room, "end", None)
    events = node_clients.wait_events("roamer", until="end")
    assert [(e["event"], e["data"], e["offset"]) for e in events[1:-1]] == [
        ("missed", _described(_blob(f"m{n}")), missed[n]) for n in range(3)
    ]
    stay = node_clients.wait_events("stay", until="end")
    assert [e["data"] for e in stay[1:-1]] == [_described(_blob(f"m{n}")) for n in range(3)]


async def test_roomcast_publish_reads_binary_markers(
    brokers: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    """``roomcast publish --redis-url ... --data`` reads ``{"$binary": ...}`` as the API does;
    bad base64 exits 2 naming --data and publishes nothing."""
    broker, got = await brokers()
    await broker.subscribe("cli")
    base = [sys.executable, "-m", "roomcast", "publish", "--redis-url", redis_url]
    base += ["--redis-prefix", redis_prefix, "--room", "cli", "--event", "file", "--data"]

    def run(data: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, data], capture_output=True, text=True, check=False)

    bad = await asyncio.to_thread(run, '{"body": {"$binary": "AAE"}}')
    assert bad.returncode == 2 and "--data" in bad.stderr and "base64" in bad.stderr, bad
    good = await asyncio.to_thread(run, '{"body": {"$binary": "AAH/"}}')
    assert good.returncode == 0, good.stderr
    await got.wait_for(1)
    assert got.publications[0].data == {"body": b"\x00\x01\xff"}


async def test_binary_on_a_cluster(redis_cluster_url: str, redis_prefix: str) -> None:
    """On Redis Cluster (no feed: the script runs on the room's node), a binary publication is
    delivered from the stream and kept in history byte for byte."""
    broker = RedisBroker(redis_cluster_url, prefix=redis_prefix)
    got = Deliveries()
    await broker.start(got)
    try:
        assert broker.is_cluster
        await broker.subscribe("cluster-bin")
        data = {"body": ALL_BYTES, "more": [b"\x00"]}
        result = await broker.publish(PublishRequest("cluster-bin", "file", data))
        await got.wait_for(1)
        assert (got.publications[0].data, got.publications[0].offset) == (data, result.offset)
        history = await broker.history("cluster-bin", "0")
        assert [p.data for p in history.publications] == [data]
    finally:
        await broker.stop()
