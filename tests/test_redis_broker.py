"""The Redis broker against real redis-server processes: interop, isolation, outages, cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

import redis_fixtures
from redis_fixtures import Deliveries, RedisServer, eventually
from roomcast.auth import InvalidRoomError
from roomcast.broker.base import BrokerState, BrokerUnavailableError, PublishRequest
from roomcast.broker.keys import Keys, keyspace_channel
from roomcast.broker.offsets import parse_offset
from roomcast.broker.redis import RedisBroker
from roomcast.publisher import Publisher

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
redis_server_factory = redis_fixtures.redis_server_factory
redis_cluster_url = redis_fixtures.redis_cluster_url

pytestmark = pytest.mark.redis

ServerFactory = Callable[..., RedisServer]


def state_of(broker: RedisBroker) -> BrokerState:
    """The state, read through a call (so type checkers do not keep an earlier narrowing)."""
    return broker.state


async def xadd(raw: aioredis.Redis, key: str, fields: Mapping[str, str | bytes]) -> str:
    """XADD with a plain client, as another service would; return the entry id."""
    entry_id = await raw.xadd(key, dict(fields))  # type: ignore[arg-type]
    return cast(bytes, entry_id).decode()


def envelope(room: str, n: int, **extra: str) -> dict[str, str]:
    """An envelope as a service in another language would XADD it."""
    fields = {
        "room": room,
        "event": "update",
        "data": orjson.dumps({"n": n}).decode(),
        "id": f"ext-{n}",
        "published_at": str(int(time.time() * 1000)),
    }
    fields.update(extra)
    return fields


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis client, standing in for services that publish without Roomcast."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def brokers(redis_url: str, redis_prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """Start RedisBrokers on the shared server under the test's prefix; stop them after."""
    started: list[RedisBroker] = []

    async def start(url: str = redis_url, **options: Any) -> tuple[RedisBroker, Deliveries]:
        broker = RedisBroker(url, prefix=redis_prefix, **options)
        deliveries = Deliveries()
        await broker.start(deliveries)
        started.append(broker)
        return broker, deliveries

    yield start
    for broker in started:
        await broker.stop()


async def test_plain_xadd_from_another_language_is_delivered(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """An envelope XADDed by a plain client is decoded and delivered like a published one."""
    broker, deliveries = await brokers()
    await broker.subscribe("ext")
    key = Keys(redis_prefix).room("ext")
    extra = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "custom": "ignored"}
    entry_id = await xadd(raw, key, envelope("ext", 1, **extra))
    await deliveries.wait_for(1)
    (publication,) = deliveries.publications
    assert publication.offset == entry_id
    assert (publication.id, publication.event, publication.data) == ("ext-1", "update", {"n": 1})
    assert publication.traceparent == extra["traceparent"]


async def test_malformed_envelopes_are_counted_and_skipped(
    brokers: Callable[..., Any],
    raw: aioredis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed entries are counted and logged with their id; later entries still arrive."""
    broker, deliveries = await brokers()
    await broker.subscribe("bad")
    key = Keys(redis_prefix).room("bad")
    good = envelope("bad", 1)
    malformed: list[dict[str, str | bytes]] = [
        {k: v for k, v in good.items() if k != "event"},
        {**good, "data": "{not json"},
        {**good, "published_at": "yesterday"},
        {**good, "room": "another-room"},
        {**good, "data": b"\xff\xfe"},
        {**good, "event": "disconnect"},  # socket.io's own: the client would reconnect
        {**good, "event": "roomcast:disconnect"},  # the gateway's own: a forged order
    ]
    with caplog.at_level(logging.WARNING, logger="roomcast.broker"):
        bad_ids = [await xadd(raw, key, fields) for fields in malformed]
        await xadd(raw, key, good)
        await deliveries.wait_for(1)
    assert [p.data for p in deliveries.publications] == [{"n": 1}]
    assert broker.dropped["malformed_envelope"] == len(malformed)
    for entry_id in bad_ids:
        assert any(entry_id in record.getMessage() for record in caplog.records), entry_id
    history = await broker.history("bad", "0")
    assert [p.data for p in history.publications] == [{"n": 1}]
    assert broker.dropped["history_malformed_envelope"] == len(malformed)
    assert broker.dropped["malformed_envelope"] == len(malformed)


async def test_two_instances_receive_only_their_rooms(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """Each instance subscribes to, and is delivered, only the rooms it has members for."""
    first, first_got = await brokers()
    second, second_got = await brokers()
    await first.subscribe("only-first")
    await second.subscribe("only-second")
    for n in range(5):
        await first.publish(PublishRequest("only-second", "e", n))
        await second.publish(PublishRequest("only-first", "e", n))
    await first_got.wait_for(5)
    await second_got.wait_for(5)
    # The sentinels come last: once they arrived, anything else would have arrived too.
    await first.publish(PublishRequest("only-first", "e", "end"))
    await second.publish(PublishRequest("only-second", "e", "end"))
    await first_got.wait_for(6)
    await second_got.wait_for(6)
    assert {p.room for p in first_got.publications} == {"only-first"}
    assert {p.room for p in second_got.publications} == {"only-second"}
    assert len(first_got.publications) == len(second_got.publications) == 6
    keys = Keys(redis_prefix)
    counts = dict(
        await raw.pubsub_numsub(
            keyspace_channel(0, keys.room("only-first")),
            keyspace_channel(0, keys.room("only-second")),
        )
    )
    assert list(counts.values()) == [1, 1]


async def test_a_room_whose_key_is_not_a_stream_fails_alone(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """One XREAD serves every dirty room; a key of the wrong type fails it as a whole, and the
    room-by-room fallback then counts that room and delivers the others."""
    broker, got = await brokers()
    await broker.subscribe("broken")
    await broker.subscribe("fine")
    keys = Keys(redis_prefix)
    async with raw.pipeline(transaction=True) as tx:  # both notified, then "broken" replaced
        tx.xadd(keys.room("broken"), envelope("broken", 1))  # type: ignore[arg-type]
        tx.xadd(keys.room("fine"), envelope("fine", 1))  # type: ignore[arg-type]
        tx.delete(keys.room("broken"))
        tx.set(keys.room("broken"), "not a stream")
        await tx.execute()
    await got.wait_for(1)
    await eventually(lambda: broker.errors["read_failed"] >= 1, what="read_failed counted")
    assert [(p.room, p.data) for p in got.publications] == [("fine", {"n": 1})]
    await broker.publish(PublishRequest("fine", "e", "after"))
    await got.wait_for(2)
    assert got.publications[-1].data == "after"


async def test_a_fetch_of_several_publications_is_delivered_in_one_batch(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    """Entries read by one fetch are delivered inside the node's batch scope, so each client
    gets them in one write; a lone entry is delivered outside it."""
    scopes: list[list[Any]] = []
    inside: list[Any] | None = None

    @contextlib.contextmanager
    def batch() -> Iterator[None]:
        nonlocal inside
        inside = []
        try:
            yield
        finally:
            scopes.append(inside)
            inside = None

    outside: list[Any] = []

    def handler(publication: Any) -> None:
        (inside if inside is not None else outside).append(publication.data)

    broker = RedisBroker(redis_url, prefix=redis_prefix)
    await broker.start(handler, batch=batch)
    try:
        await broker.subscribe("burst")
        key = Keys(redis_prefix).room("burst")
        async with raw.pipeline(transaction=True) as tx:  # three entries, one wake-up
            for n in range(3):
                tx.xadd(key, envelope("burst", n))  # type: ignore[arg-type]
            await tx.execute()
        await eventually(lambda: sum(map(len, scopes)) == 3, what="three in a batch")
        assert scopes == [[{"n": 0}, {"n": 1}, {"n": 2}]]
        await broker.publish(PublishRequest("burst", "e", "alone"))
        await eventually(lambda: outside == ["alone"], what="a lone delivery")
        assert len(scopes) == 1
    finally:
        await broker.stop()


async def test_concurrent_publishes_share_round_trips_and_keep_their_order(
    brokers: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishes issued together go out in batches over one connection; each gets its own
    entry id, ids follow issue order, and every entry is delivered once."""
    broker, got = await brokers()
    await broker.subscribe("burst")
    batches = 0
    eval_batch = broker._lane._eval_batch

    async def counting(*args: Any, **kwargs: Any) -> None:
        nonlocal batches
        batches += 1
        await eval_batch(*args, **kwargs)

    monkeypatch.setattr(broker._lane, "_eval_batch", counting)
    results = await asyncio.gather(
        *(broker.publish(PublishRequest("burst", "e", n)) for n in range(300))
    )
    offsets = [r.offset for r in results]
    assert len(set(offsets)) == 300
    assert offsets == sorted(offsets, key=lambda o: tuple(int(x) for x in o.split("-")))
    assert 1 <= batches <= 10, f"{batches} round trips for 300 publishes issued together"
    await got.wait_for(300)
    assert [p.data for p in got.publications] == list(range(300))


async def test_publishes_survive_a_flushed_script_cache(
    brokers: Callable[..., Any], raw: aioredis.Redis
) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) the scripts that got NOSCRIPT are sent
    again as EVAL, and every publisher gets its own entry."""
    broker, got = await brokers()
    await broker.subscribe("flushed")
    await broker.publish(PublishRequest("flushed", "e", "before"))
    await raw.script_flush()
    results = await asyncio.gather(
        *(broker.publish(PublishRequest("flushed", "e", n)) for n in range(20))
    )
    assert len({r.offset for r in results}) == 20
    await got.wait_for(21)
    assert [p.data for p in got.publications] == ["before", *range(20)]


async def test_stop_ends_waiting_publishers_with_unavailable(
    brokers: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() never leaves a publisher waiting, nor cancels it: a publish in flight or queued
    ends with BrokerUnavailableError, and later publishes are refused."""
    broker, _ = await brokers()
    sent = asyncio.Event()

    async def hung(*_args: Any, **_kwargs: Any) -> None:  # Redis that never answers
        sent.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(broker._lane, "_eval_batch", hung)
    tasks = [
        asyncio.ensure_future(broker.publish(PublishRequest("late", "e", n))) for n in range(50)
    ]
    await sent.wait()
    tasks.append(asyncio.ensure_future(broker.publish(PublishRequest("late", "e", "queued"))))
    await asyncio.sleep(0)
    await broker.stop()
    done, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending
    for task in done:
        assert not task.cancelled()
        assert isinstance(task.exception(), BrokerUnavailableError), task.exception()
    with pytest.raises(BrokerUnavailableError, match="stopped"):
        await broker.publish(PublishRequest("late", "e", "after"))


async def test_publish_after_a_quiet_restart_reconnects_its_connection(
    redis_server_factory: ServerFactory, redis_prefix: str
) -> None:
    """Redis restarts while nothing is published: the next publish must not fail on the
    publishing connection that Redis closed meanwhile."""
    server = redis_server_factory()
    broker = RedisBroker(server.url, prefix=redis_prefix, backoff_initial=0.05, backoff_max=0.2)
    deliveries = Deliveries()
    await broker.start(deliveries)
    try:
        await broker.subscribe("quiet")
        await broker.publish(PublishRequest("quiet", "e", "before"))
        await deliveries.wait_for(1)
        server.kill()
        await eventually(lambda: broker.state is BrokerState.DISCONNECTED, what="disconnect")
        server.start()
        await eventually(lambda: broker.state is BrokerState.CONNECTED, what="reconnect")
        await broker.publish(PublishRequest("quiet", "e", "after"))
        await deliveries.wait_for(2)
    finally:
        await broker.stop()
    assert [p.data for p in deliveries.publications] == ["before", "after"]


async def test_published_entries_arrive_by_the_feed_without_reading_the_stream(
    brokers: Callable[..., Any], raw: aioredis.Redis
) -> None:
    """On one server, an entry published through Roomcast reaches every subscribed instance
    with its notification: delivered in order, once, and without a stream read."""
    first, first_got = await brokers()
    second, second_got = await brokers()
    for broker in (first, second):
        await broker.subscribe("fed")
    await first.publish(PublishRequest("fed", "e", "warm-up"))  # after the catch-up read
    for got in (first_got, second_got):
        await got.wait_for(1)
    fed_before = (first.fed, second.fed)
    reads_before = await stream_reads(raw)
    results = [await first.publish(PublishRequest("fed", "e", n)) for n in range(20)]
    for broker, got, before in (
        (first, first_got, fed_before[0]),
        (second, second_got, fed_before[1]),
    ):
        await got.wait_for(21)
        assert [p.offset for p in got.publications[1:]] == [r.offset for r in results]
        assert [p.data for p in got.publications[1:]] == list(range(20))
        assert broker.fed - before == 20
    assert await stream_reads(raw) == reads_before


async def stream_reads(raw: aioredis.Redis) -> int:
    """How many XREAD and XRANGE commands the server has run."""
    stats = await raw.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("xread", "xrange")
    )


async def test_fed_entries_of_several_rooms_are_delivered_in_entry_order(
    brokers: Callable[..., Any],
) -> None:
    """Entries of several rooms arriving in one burst are delivered sorted by entry id, as a
    fetch delivers them: in one millisecond room a may get -0, -1, -2 before room b gets -0."""
    broker, deliveries = await brokers()
    publisher, _ = await brokers()
    for room in ("ord-a", "ord-b"):
        await broker.subscribe(room)
    await publisher.publish(PublishRequest("ord-a", "e", "warm-up"))
    await deliveries.wait_for(1)
    for round_ in range(20):
        await asyncio.gather(
            *(
                publisher.publish(PublishRequest(room, "e", round_))
                for room in ["ord-a"] * 3 + ["ord-b"]
            )
        )
        await deliveries.wait_for(2 + 4 * round_ + 3)
        burst = [parse_offset(p.offset) for p in deliveries.publications[-4:]]
        assert burst == sorted(burst), deliveries.publications[-4:]
    assert broker.fed > 0


async def test_feed_channels_are_per_database(
    redis_url: str, redis_prefix: str, brokers: Callable[..., Any]
) -> None:
    """Pub/sub is shared by every database of a server: an instance on one database never
    takes another database's feed messages."""
    db = int(urlsplit(redis_url).path.strip("/") or 0)
    other_url = urlsplit(redis_url)._replace(path=f"/{db + 1}").geturl()
    broker, deliveries = await brokers()
    other, other_got = await brokers(other_url)
    for instance in (broker, other):
        await instance.subscribe("shared")
    await other.publish(PublishRequest("shared", "e", "other database"))
    await other_got.wait_for(1)
    await broker.publish(PublishRequest("shared", "e", "this database"))
    await deliveries.wait_for(1)
    await asyncio.sleep(0.05)
    assert [p.data for p in deliveries.publications] == ["this database"]
    assert [p.data for p in other_got.publications] == ["other database"]


async def test_feed_and_plain_xadds_interleaved_deliver_every_entry_once_in_order(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """Plain XADDs (no feed message) between published entries: the feed is trusted only
    for an entry that follows the last delivered one, the rest is read from the stream."""
    broker, deliveries = await brokers()
    publisher, _ = await brokers()
    await broker.subscribe("mix")
    key = Keys(redis_prefix).room("mix")

    async def plain(n: int) -> str:
        return await xadd(raw, key, envelope("mix", n))

    async def published(n: int) -> str:
        return (await publisher.publish(PublishRequest("mix", "update", {"n": n}))).offset

    for n in range(0, 30, 3):  # one at a time: each published entry follows a delivered one
        await plain(n)
        await deliveries.wait_for(n + 1)
        for m in (n + 1, n + 2):
            await published(m)
            await deliveries.wait_for(m + 1)
    assert broker.fed == 20
    for n in range(30, 60, 2):  # concurrently: the feed is trusted or not, nothing is lost
        await asyncio.gather(plain(n), published(n + 1))
    entries = await raw.xrange(key)
    assert len(entries) == 60
    await deliveries.wait_for(len(entries))
    await asyncio.sleep(0.05)  # nothing more may come
    assert [p.offset for p in deliveries.publications] == [e[0].decode() for e in entries]


async def test_a_feed_message_not_following_the_last_entry_is_not_trusted(
    brokers: Callable[..., Any],
    redis_url: str,
    raw: aioredis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A feed message naming another predecessor is not delivered (the stream is read
    instead); a malformed one, or one whose entry id is far in the future, is counted and
    logged, and loses nothing."""
    broker, deliveries = await brokers()
    await broker.subscribe("forged")
    first = await broker.publish(PublishRequest("forged", "e", "first"))
    await deliveries.wait_for(1)
    feed = Keys(redis_prefix).feed("forged", int(urlsplit(redis_url).path.strip("/") or 0))
    body = orjson.dumps(envelope("forged", 99)).decode()
    await raw.publish(feed, f"1-0 99999999999999-0 {body}")  # wrong predecessor
    with caplog.at_level(logging.WARNING, logger="roomcast.broker"):
        await raw.publish(feed, f"{first.offset} 99999999999999-0 {{not json")
        await raw.publish(feed, f"{first.offset} 99999999999999-0 {body}")  # far in the future
        await eventually(lambda: broker.errors["bad_feed_message"] == 2, what="bad messages")
    assert any("is in the future" in r.getMessage() for r in caplog.records)
    await broker.publish(PublishRequest("forged", "e", "second"))
    await deliveries.wait_for(2)
    await asyncio.sleep(0.05)
    assert [p.data for p in deliveries.publications] == ["first", "second"]


async def test_direct_duplicate_idempotency_keys_skipped_by_every_instance(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """Two instances deliver the same first entry of a repeated idempotency key, and skip the rest."""
    first, first_got = await brokers()
    second, second_got = await brokers()
    await first.subscribe("dup")
    await second.subscribe("dup")
    key = Keys(redis_prefix).room("dup")
    ids = [
        await xadd(raw, key, envelope("dup", n, idempotency_key=k))
        for n, k in enumerate(["k1", "k1", "k2", "k1"])
    ]
    await first.publish(PublishRequest("dup", "e", "end"))
    for got in (first_got, second_got):
        await got.wait_for(3)
        assert [p.offset for p in got.publications[:2]] == [ids[0], ids[2]]
        assert got.publications[2].data == "end"
    assert first.dropped["duplicate_idempotency_key"] == 2
    assert second.dropped["duplicate_idempotency_key"] == 2


async def test_publish_uses_the_idempotency_record_deliveries_check(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """A direct XADD repeating a key first used by publish() is skipped on delivery."""
    broker, deliveries = await brokers()
    await broker.subscribe("mixed")
    first = await broker.publish(PublishRequest("mixed", "e", "first", idempotency_key="k"))
    key = Keys(redis_prefix).room("mixed")
    await xadd(raw, key, envelope("mixed", 2, idempotency_key="k"))
    await broker.publish(PublishRequest("mixed", "e", "end"))
    await deliveries.wait_for(2)
    assert [p.data for p in deliveries.publications] == ["first", "end"]
    assert deliveries.publications[0].id == first.id
    stored = await raw.get(Keys(redis_prefix).idempotency("mixed", "k"))
    assert stored == f"{first.id}|{first.offset}".encode()


async def test_outage_delivers_every_entry_exactly_once(
    redis_server_factory: ServerFactory, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across a redis-server kill and restart, every entry is delivered once and in order."""
    server = redis_server_factory()
    broker = RedisBroker(server.url, prefix=redis_prefix, backoff_initial=0.05, backoff_max=0.2)
    deliveries = Deliveries()
    await broker.start(deliveries)
    # Hold reconnects until the test says so, to append entries while the broker is away.
    reconnect_allowed = asyncio.Event()
    attempts = 0
    open_epoch = broker._open_epoch

    async def gated_open_epoch() -> None:
        nonlocal attempts
        attempts += 1
        await reconnect_allowed.wait()
        await open_epoch()

    monkeypatch.setattr(broker, "_open_epoch", gated_open_epoch)
    try:
        await broker.subscribe("live")
        for n in range(3):
            await broker.publish(PublishRequest("live", "e", f"before-{n}"))
        await deliveries.wait_for(3)

        server.kill()
        await eventually(lambda: broker.state is BrokerState.DISCONNECTED, what="disconnect")
        with pytest.raises(BrokerUnavailableError, match="redis unavailable"):
            await broker.publish(PublishRequest("live", "e", "lost"))

        server.start()
        # A service appends entries right after the restart, before the broker is back; the
        # restarted server has notifications off, so only the catch-up can find them.
        raw = aioredis.Redis.from_url(server.url)
        try:
            key = Keys(redis_prefix).room("live")
            for n in range(3):
                await xadd(raw, key, envelope("live", n))
        finally:
            await raw.aclose()
        assert broker.state is BrokerState.DISCONNECTED and attempts >= 1
        reconnect_allowed.set()
        await eventually(lambda: broker.state is BrokerState.CONNECTED, what="reconnect")
        for n in range(3):
            await broker.publish(PublishRequest("live", "e", f"after-{n}"))
        await deliveries.wait_for(9)
        await broker.publish(PublishRequest("live", "e", "end"))
        await deliveries.wait_for(10)
    finally:
        await broker.stop()
    data = [p.data for p in deliveries.publications]
    assert data == [
        *(f"before-{n}" for n in range(3)),
        *({"n": n} for n in range(3)),
        *(f"after-{n}" for n in range(3)),
        "end",
    ]
    assert len({p.offset for p in deliveries.publications}) == 10
    assert broker.reconnects == 1
    assert state_of(broker) is BrokerState.STOPPED


async def test_start_fails_fast_when_redis_is_down(
    redis_server_factory: ServerFactory, redis_prefix: str
) -> None:
    """Starting against an unreachable Redis raises BrokerUnavailableError."""
    server = redis_server_factory()
    server.kill()
    broker = RedisBroker(server.url, prefix=redis_prefix)
    with pytest.raises(BrokerUnavailableError, match="redis unavailable"):
        await broker.start(Deliveries())
    assert broker.state is BrokerState.STOPPED
    await broker.stop()


async def test_notification_flags_are_merged_into_existing_config(
    redis_server_factory: ServerFactory, redis_prefix: str
) -> None:
    """Starting adds 'K' and 't' to notify-keyspace-events and keeps the operator's flags."""
    server = redis_server_factory("--notify-keyspace-events", "Ex")
    broker = RedisBroker(server.url, prefix=redis_prefix)
    await broker.start(Deliveries())
    try:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        config = await client.config_get("notify-keyspace-events")
        await client.aclose()
    finally:
        await broker.stop()
    assert set(str(config["notify-keyspace-events"])) >= set("KtEx")


async def test_refused_config_with_notifications_on_is_ready(
    redis_server_factory: ServerFactory, redis_prefix: str
) -> None:
    """With CONFIG disabled but notifications configured by the operator, the broker works."""
    server = redis_server_factory(
        "--rename-command", "CONFIG", "", "--notify-keyspace-events", "Kt"
    )
    broker = RedisBroker(server.url, prefix=redis_prefix)
    deliveries = Deliveries()
    await broker.start(deliveries)
    try:
        await eventually(lambda: broker.ready, what="notifications verified")
        await broker.subscribe("r")
        await broker.publish(PublishRequest("r", "e", 1))
        await deliveries.wait_for(1)
    finally:
        await broker.stop()


async def test_refused_config_without_notifications_is_not_ready(
    redis_server_factory: ServerFactory, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With CONFIG disabled and notifications off, the broker logs what to set and is not ready."""
    server = redis_server_factory("--rename-command", "CONFIG", "")
    broker = RedisBroker(server.url, prefix=redis_prefix)
    with caplog.at_level(logging.ERROR, logger="roomcast.broker"):
        await broker.start(Deliveries())
        try:
            await eventually(
                lambda: "keyspace notifications for streams are off" in caplog.text,
                what="the not-ready error",
            )
            assert broker.state is BrokerState.CONNECTED
            assert not broker.ready
            assert "notify-keyspace-events" in (broker.not_ready_reason or "")
        finally:
            await broker.stop()
    assert "The operator must enable keyspace notifications" in caplog.text


async def test_history_of_an_expired_room_is_incomplete(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """When a room's stream expired, history after an old offset cannot claim completeness."""
    broker, _ = await brokers(history_ttl_ms=50)
    result = await broker.publish(PublishRequest("short", "e", 1))
    key = Keys(redis_prefix).room("short")
    assert 0 < await raw.pttl(key) <= 50
    deadline = time.monotonic() + 5
    while await raw.exists(key):
        assert time.monotonic() < deadline, "the stream did not expire"
        await asyncio.sleep(0.01)
    expired = await broker.history("short", result.offset)
    assert not expired.complete and expired.publications == []
    # A stream recreated after the expiry cannot prove that nothing was lost in between.
    again = await broker.publish(PublishRequest("short", "e", 2))
    recreated = await broker.history("short", result.offset)
    assert not recreated.complete
    assert [p.offset for p in recreated.publications] == [again.offset]
    assert (await broker.history("short", again.offset)).complete


async def test_invalid_room_names_are_rejected(brokers: Callable[..., Any]) -> None:
    """Room names with braces or other characters outside the allowed set never reach Redis."""
    broker, _ = await brokers()
    for room in ["", "a{b}", "with space", "x" * 257]:
        with pytest.raises(InvalidRoomError):
            await broker.publish(PublishRequest(room, "e", 1))
        with pytest.raises(InvalidRoomError):
            await broker.subscribe(room)


async def test_upstream_entries_are_readable_by_a_consumer_group(
    brokers: Callable[..., Any], raw: aioredis.Redis, redis_prefix: str
) -> None:
    """Upstream entries land in '<prefix>:upstream' and a consumer group reads them."""
    broker, _ = await brokers()
    stream = Keys(redis_prefix).upstream()
    await raw.xgroup_create(stream, "backend", id="$", mkstream=True)
    entry_id = await broker.append_upstream({"event": "typing", "data": '{"room":"r"}'})
    entries: Any = await raw.xreadgroup("backend", "worker-1", {stream: ">"}, count=10)
    [(name, [(got_id, fields)])] = entries
    assert (name.decode(), got_id.decode()) == (stream, entry_id)
    assert fields == {b"event": b"typing", b"data": b'{"room":"r"}'}
    assert await raw.xack(stream, "backend", got_id) == 1


async def test_publisher_publishes_without_a_started_broker(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    """Publisher.from_url connects lazily and writes the same envelope the broker reads."""
    publisher = Publisher.from_url(redis_url, prefix=redis_prefix)
    try:
        result = await publisher.publish("pub", "news", {"a": 1}, idempotency_key="once")
        again = await publisher.publish("pub", "news", {"a": 2}, idempotency_key="once")
        with pytest.raises(InvalidRoomError):
            await publisher.publish("bad room", "news", 1)
    finally:
        await publisher.close()
    assert again.duplicate and again.id == result.id
    stored: Any = await raw.xrange(Keys(redis_prefix).room("pub"))
    [(entry_id, fields)] = stored
    assert entry_id.decode() == result.offset
    assert fields[b"data"] == b'{"a":1}' and fields[b"id"] == result.id.encode()


async def test_cluster_publish_before_start(redis_cluster_url: str, redis_prefix: str) -> None:
    """A publisher that never starts the broker learns it is on a cluster before publishing."""
    publisher = RedisBroker(redis_cluster_url, prefix=redis_prefix)
    try:
        results = await asyncio.gather(
            *(publisher.publish(PublishRequest(f"room-{n}", "e", n)) for n in range(5))
        )
    finally:
        await publisher.stop()
    assert all(r.offset and not r.duplicate for r in results)
    raw = aioredis.RedisCluster.from_url(redis_cluster_url)
    try:
        lengths = [await raw.xlen(Keys(redis_prefix).room(f"room-{n}")) for n in range(5)]
    finally:
        await raw.aclose()
    assert lengths == [1] * 5


async def test_cluster_publish_deliver_history(redis_cluster_url: str, redis_prefix: str) -> None:
    """On a 3-node cluster, rooms on every node are delivered and their history is complete."""
    # A short ping interval runs the slot-map check many times during the test.
    broker = RedisBroker(redis_cluster_url, prefix=redis_prefix, ping_interval=0.05)
    deliveries = Deliveries()
    await broker.start(deliveries)
    try:
        assert broker.is_cluster
        slots = sorted(broker._topology)
        assert slots[0][0] == 0 and slots[-1][1] == 16383 and len({n for *_, n in slots}) == 3
        rooms = [f"cluster-{n}" for n in range(12)]
        nodes = {broker._node_name(Keys(redis_prefix).room(room)) for room in rooms}
        assert len(nodes) == 3, "the rooms should spread over all three nodes"
        for room in rooms:
            await broker.subscribe(room)
        results = {}
        for room in rooms:
            results[room] = [
                await broker.publish(PublishRequest(room, "e", n, idempotency_key=f"k{n % 2}"))
                for n in range(3)
            ]
        await deliveries.wait_for(2 * len(rooms))
        for room in rooms:
            assert [p.data for p in deliveries.in_room(room)] == [0, 1]
            assert results[room][2].duplicate
            history = await broker.history(room, "0")
            assert history.complete
            assert [p.offset for p in history.publications] == [r.offset for r in results[room][:2]]
        await broker.save_session("cluster-pid", b"s", 60_000)
        await broker.touch_sessions(["cluster-pid", "other-pid"], 60_000)
        assert await broker.take_session("cluster-pid") == b"s"
        assert await broker.append_upstream({"event": "x"})
        assert broker.reconnects == 0 and broker.ready
        assert broker.fed == 0  # no feed on a cluster: PUBLISH would reach every node
    finally:
        await broker.stop()


async def test_commands_with_unencodable_arguments_raise_data_error(redis_url: str) -> None:
    """Commands are packed by hiredis, but a bad argument fails as redis-py says it does
    (``DataError``), and the connection stays usable."""
    broker = RedisBroker(redis_url)
    client = await broker._ensure_client()
    try:
        for bad in (None, True, object()):
            with pytest.raises(DataError, match="Invalid input of type"):
                await client.set("roomcast-test-pack", bad)  # type: ignore[arg-type]
        assert await client.set("roomcast-test-pack", 1.5)
        assert await client.get("roomcast-test-pack") == b"1.5"
    finally:
        await client.delete("roomcast-test-pack")
        await broker.stop()
