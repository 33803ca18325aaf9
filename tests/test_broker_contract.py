"""One contract, every broker: the behaviour the node relies on, checked on memory and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import pytest

import redis_fixtures
from redis_fixtures import Deliveries
from roomcast.broker.base import Admission, Broker, BrokerState, PublishRequest, UserQuota
from roomcast.broker.memory import MemoryBroker
from roomcast.broker.offsets import parse_offset
from roomcast.broker.redis import RedisBroker

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class MakeBroker(Protocol):
    def __call__(self, **options: Any) -> Awaitable[tuple[Broker, Deliveries]]: ...


def state_of(broker: Broker) -> BrokerState:
    return broker.state


@pytest.fixture(params=["memory", "redis"])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[MakeBroker]:
    """Start brokers of one kind, each with a recording handler; stop them afterwards."""
    started: list[Broker] = []
    factory: Callable[..., Broker]
    if request.param == "memory":
        factory = MemoryBroker
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

        def factory(**options: Any) -> Broker:
            return RedisBroker(url, prefix=prefix, **options)

    async def make(**options: Any) -> tuple[Broker, Deliveries]:
        broker = factory(**options)
        deliveries = Deliveries()
        await broker.start(deliveries)
        started.append(broker)
        return broker, deliveries

    yield make
    for broker in started:
        await broker.stop()


async def test_start_connects(make_broker: MakeBroker) -> None:
    """A started broker reports CONNECTED and a stopped one STOPPED."""
    broker, _ = await make_broker()
    assert state_of(broker) is BrokerState.CONNECTED
    await broker.stop()
    assert state_of(broker) is BrokerState.STOPPED


async def test_publications_of_subscribed_room_delivered_in_order(make_broker: MakeBroker) -> None:
    """Every publication of a subscribed room reaches the handler once, in publish order."""
    broker, deliveries = await make_broker()
    await broker.subscribe("chat:1")
    results = [
        await broker.publish(PublishRequest("chat:1", "message", {"n": n})) for n in range(20)
    ]
    await deliveries.wait_for(20)
    got = deliveries.publications
    assert [p.data for p in got] == [{"n": n} for n in range(20)]
    assert [p.offset for p in got] == [r.offset for r in results]
    assert [p.id for p in got] == [r.id for r in results]
    assert len({r.id for r in results}) == 20
    offsets = [parse_offset(r.offset) for r in results]
    assert offsets == sorted(offsets) and len(set(offsets)) == 20


async def test_publication_fields_survive_delivery(make_broker: MakeBroker) -> None:
    """Event, data, idempotency key, traceparent and excluded socket id arrive unchanged."""
    broker, deliveries = await make_broker()
    await broker.subscribe("room/a@b.c")
    data = {"text": "héllo", "list": [1, 2.5, None, True], "nested": {"k": "v"}}
    request = PublishRequest(
        "room/a@b.c", "chat message", data, "key-1", TRACEPARENT, exclude_sid="sid123"
    )
    result = await broker.publish(request)
    await deliveries.wait_for(1)
    (publication,) = deliveries.publications
    assert publication.room == "room/a@b.c"
    assert publication.event == "chat message"
    assert publication.data == data
    assert publication.idempotency_key == "key-1"
    assert publication.traceparent == TRACEPARENT
    assert publication.exclude_sid == "sid123"
    assert (publication.id, publication.offset) == (result.id, result.offset)
    assert publication.published_at_ms > 0


async def test_unsubscribed_rooms_are_not_delivered(make_broker: MakeBroker) -> None:
    """Rooms never subscribed, or unsubscribed, produce no deliveries."""
    broker, deliveries = await make_broker()
    await broker.subscribe("left")
    await broker.unsubscribe("left")
    await broker.subscribe("kept")
    await broker.publish(PublishRequest("never", "e", 1))
    await broker.publish(PublishRequest("left", "e", 2))
    await broker.publish(PublishRequest("kept", "e", 3))
    await deliveries.wait_for(1)
    # A sentinel after the others: once it arrived, anything earlier would have too.
    await broker.publish(PublishRequest("kept", "e", 4))
    await deliveries.wait_for(2)
    assert [(p.room, p.data) for p in deliveries.publications] == [("kept", 3), ("kept", 4)]


async def test_subscribe_is_idempotent(make_broker: MakeBroker) -> None:
    """Subscribing twice delivers each publication once; one unsubscribe ends it."""
    broker, deliveries = await make_broker()
    await broker.subscribe("twice")
    await broker.subscribe("twice")
    await broker.publish(PublishRequest("twice", "e", 1))
    await broker.publish(PublishRequest("twice", "e", 2))
    await deliveries.wait_for(2)
    assert [p.data for p in deliveries.publications] == [1, 2]


async def test_history_after_offset(make_broker: MakeBroker) -> None:
    """History returns exactly the publications after an offset, oldest first, and complete."""
    broker, _ = await make_broker()
    results = [await broker.publish(PublishRequest("h", "e", n)) for n in range(5)]
    history = await broker.history("h", results[1].offset)
    assert history.complete
    assert [p.data for p in history.publications] == [2, 3, 4]
    assert [p.offset for p in history.publications] == [r.offset for r in results[2:]]
    assert [p.id for p in history.publications] == [r.id for r in results[2:]]
    latest = await broker.history("h", results[-1].offset)
    assert latest.complete and latest.publications == []
    everything = await broker.history("h", "0")
    assert [p.data for p in everything.publications] == [0, 1, 2, 3, 4]
    assert (await broker.history("unused-room", "0")).complete


async def test_history_is_incomplete_after_trimming(make_broker: MakeBroker) -> None:
    """Once publications after an offset were trimmed, history says it is incomplete."""
    broker, _ = await make_broker(history_size=5)
    # Redis trims with MAXLEN ~, whole nodes of 100 entries at a time: publish well past it.
    results = [await broker.publish(PublishRequest("trim", "e", n)) for n in range(250)]
    trimmed = await broker.history("trim", results[0].offset)
    assert not trimmed.complete
    assert trimmed.publications[0].data > 1
    assert [p.data for p in trimmed.publications][-3:] == [247, 248, 249]
    recent = await broker.history("trim", results[-3].offset)
    assert recent.complete
    assert [p.data for p in recent.publications] == [248, 249]


async def test_idempotent_publish_returns_the_original(make_broker: MakeBroker) -> None:
    """A repeated idempotency key returns the first publication's id and publishes nothing."""
    broker, deliveries = await make_broker()
    await broker.subscribe("idem")
    first = await broker.publish(PublishRequest("idem", "e", 1, idempotency_key="k"))
    again = await broker.publish(PublishRequest("idem", "e", 2, idempotency_key="k"))
    other = await broker.publish(PublishRequest("idem", "e", 3, idempotency_key="other"))
    assert not first.duplicate and not other.duplicate
    assert again.duplicate
    assert (again.id, again.offset) == (first.id, first.offset)
    await deliveries.wait_for(2)
    assert [p.data for p in deliveries.publications] == [1, 3]
    assert [p.data for p in (await broker.history("idem", "0")).publications] == [1, 3]


async def test_idempotency_keys_are_scoped_per_room(make_broker: MakeBroker) -> None:
    """The same idempotency key in two rooms publishes in both."""
    broker, _ = await make_broker()
    a = await broker.publish(PublishRequest("room-a", "e", 1, idempotency_key="k"))
    b = await broker.publish(PublishRequest("room-b", "e", 1, idempotency_key="k"))
    assert not a.duplicate and not b.duplicate and a.id != b.id


async def test_sessions_save_take_touch_expire(make_broker: MakeBroker) -> None:
    """A session is taken once; an untouched one expires, a touched one lives on."""
    broker, _ = await make_broker()
    await broker.save_session("pid-taken", b"\x00state", 60_000)
    assert await broker.take_session("pid-taken") == b"\x00state"
    assert await broker.take_session("pid-taken") is None
    assert await broker.take_session("pid-unknown") is None

    await broker.save_session("pid-touched", b"kept", 150)
    await broker.save_session("pid-expiring", b"gone", 150)
    await broker.touch_sessions(["pid-touched", "pid-unknown"], 60_000)
    await broker.touch_sessions([], 60_000)
    # Expiry is a time contract: waiting past the TTL is what is being tested.
    await asyncio.sleep(0.4)
    assert await broker.take_session("pid-expiring") is None
    assert await broker.take_session("pid-touched") == b"kept"


async def test_append_upstream_returns_increasing_ids(make_broker: MakeBroker) -> None:
    """Upstream appends return the stored entry's id, increasing with each append."""
    broker, _ = await make_broker()
    ids = [
        await broker.append_upstream({"event": "typing", "data": "{}", "n": str(n)})
        for n in range(3)
    ]
    parsed = [parse_offset(entry_id) for entry_id in ids]
    assert parsed == sorted(parsed) and len(set(parsed)) == 3


async def test_write_sessions_saves_and_deletes_in_one_batch(make_broker: MakeBroker) -> None:
    """A batch of recovery-state writes saves states and deletes the ones given as None."""
    broker, _ = await make_broker()
    await broker.save_session("pid-old", b"old", 60_000)
    await broker.write_sessions(
        [("pid-a", b"a", 60_000), ("pid-old", None, 0), ("pid-b", b"b", 60_000)]
    )
    assert await broker.take_session("pid-a") == b"a"
    assert await broker.take_session("pid-b") == b"b"
    assert await broker.take_session("pid-old") is None


async def _admitted_eventually(broker: Broker, user: str, member: str, quota: UserQuota) -> None:
    """Poll ``admit_user`` until it admits (a window ends, a hold expires); fail after 5 s."""
    deadline = asyncio.get_running_loop().time() + 5
    while (await broker.admit_user(user, member, quota)).limit is not None:
        assert asyncio.get_running_loop().time() < deadline, f"{member} never admitted"
        await asyncio.sleep(0.01)


async def test_user_connect_rate_is_a_fixed_window(make_broker: MakeBroker) -> None:
    """New connections of a user are counted per window: over the count they are refused
    with the time left in the window; another user is not; the next window admits again."""
    broker, _ = await make_broker()
    quota = UserQuota(per_window=2, window_ms=300)
    assert await broker.admit_user("u", "m1", quota) == Admission()
    assert await broker.admit_user("u", "m2", quota) == Admission()
    refused = await broker.admit_user("u", "m3", quota)
    assert refused.limit == "user_connect_rate"
    assert 0 < refused.retry_after_ms <= 300
    assert await broker.admit_user("other", "m1", quota) == Admission()
    await asyncio.sleep(refused.retry_after_ms / 1000)  # the window's end, as told
    await _admitted_eventually(broker, "u", "m4", quota)


async def test_user_connections_are_held_until_released_or_expired(
    make_broker: MakeBroker,
) -> None:
    """A user holds at most ``concurrent`` connections; a release frees a slot at once, a
    hold nobody keeps alive frees it after its TTL, and a kept one stays."""
    broker, _ = await make_broker()
    quota = UserQuota(concurrent=2, ttl_ms=400)
    assert await broker.admit_user("u", "a", quota) == Admission()
    assert await broker.admit_user("u", "b", quota) == Admission()
    assert await broker.admit_user("u", "c", quota) == Admission("user_connections", 0)
    assert await broker.admit_user("u", "a", quota) == Admission()  # held already
    assert await broker.admit_user("v", "c", quota) == Admission()
    await broker.release_users([("u", "a"), ("u", "unknown"), ("nobody", "x")])
    assert await broker.admit_user("u", "c", quota) == Admission()
    await broker.keep_users([("u", "c")], 60_000)
    await broker.keep_users([], 60_000)
    # b is not kept alive (its instance died): its slot comes back after the TTL.
    await _admitted_eventually(broker, "u", "d", quota)
    assert (await broker.admit_user("u", "e", quota)).limit == "user_connections"
    # A hold the broker lost (flushed, or admitted while it was down) is held again by a keep.
    await broker.release_users([("u", "c"), ("u", "d")])
    await broker.keep_users([("u", "x"), ("u", "y")], 60_000)
    assert (await broker.admit_user("u", "z", quota)).limit == "user_connections"
