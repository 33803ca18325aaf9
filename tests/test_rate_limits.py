"""Rate limits: each limit hit and recovered from through the official socket.io-client and
the publish API, the per-user limits across two instances on one real Redis, the token bucket
on a controlled clock, and the production defaults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import multi_fixtures
import pytest
import websockets
from multi_fixtures import ClientsError, NodeClients, metric, redis_args

import redis_fixtures
from conftest_helpers import token_for
from redis_fixtures import wait_until
from roomcast import config, limits
from roomcast.app import Application, ConnectRefusedError
from roomcast.broker.base import Admission, UserQuota
from roomcast.broker.redis import RedisBroker
from roomcast.limits import Bucket, Rate
from roomcast.socket import KICK_GRACE_S, Socket
from wire import connect_sio, running

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer
    from multi_fixtures import GatewayFactory

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
redis_cluster_url = redis_fixtures.redis_cluster_url
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients


# --------------------------------------------------------------------------- the bucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The monotonic clock of ``roomcast.limits``, moved by the test."""
    fake = Clock()
    monkeypatch.setattr(limits, "_now", fake)
    return fake


def test_bucket_allows_the_burst_then_the_rate(clock: Clock) -> None:
    """A full bucket allows ``burst`` events at once, then one per 1/rate seconds; the
    retry-after is the time to the next token, and the bucket never holds more than burst."""
    bucket = Bucket(Rate(per_second=4, burst=3))
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after_ms() == 250
    clock.now += 0.1
    assert not bucket.take()
    assert bucket.retry_after_ms() == 150
    clock.now += 0.15
    assert bucket.take()
    clock.now += 3600
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_overflow_counts_refusals_net_of_the_rate(clock: Clock) -> None:
    """Refusals drain at the sustained rate: a socket at twice its rate is refused half its
    events but never overflows; one that floods overflows after factor x burst refusals."""
    bucket = Bucket(Rate(per_second=10, burst=5))
    for _ in range(5):
        assert bucket.take()
    for _ in range(1000):  # 20 events/s for 50 s: one of two refused
        clock.now += 0.05
        if not bucket.take():
            assert not bucket.overflowed(2.0)
    refused = 0
    while True:  # a flood: no time passes between events
        assert not bucket.take()
        refused += 1
        if bucket.overflowed(2.0):
            break
    assert refused <= 2 * 5 + 1
    assert not Bucket(Rate(1, 1)).overflowed(0)  # 0: never


def test_rate_of_settings() -> None:
    """A rate of 0 is no limit; a burst of 0 is one second's worth, at least one."""
    assert Rate.of(0, 100) is None
    assert Rate.of(20, 0) == Rate(20, 20.0)
    assert Rate.of(0.5, 0) == Rate(0.5, 1.0)
    assert Rate.of(5, 50) == Rate(5, 50.0)


def test_production_turns_the_limits_on() -> None:
    """With --production, each rate limit given nowhere takes its production default; one
    given (flag or environment) keeps its value; without it they are off."""
    required = {"jwt_secret": "s" * 48, "api_key": "k" * 16, "allowed_origins": "https://a.example"}
    dev = config.load(required, environ={})
    prod = config.load({**required, "production": True}, environ={})
    chosen = config.load(
        {**required, "production": True, "event_rate": "7"},
        environ={"ROOMCAST_API_RATE": "0"},
    )
    names = (
        "event_rate",
        "event_burst",
        "join_rate",
        "join_burst",
        "user_connect_rate",
        "max_connections_per_user",
        "api_rate",
        "api_burst",
    )
    assert [getattr(dev, name) for name in names] == [0] * len(names)
    assert all(getattr(prod, name) > 0 for name in names)
    assert (chosen.event_rate, chosen.api_rate, chosen.join_rate) == (7.0, 0.0, prod.join_rate)
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(config.ConfigError, match="event_rate"):
            config.load({"event_rate": bad}, environ={})
    with pytest.raises(config.ConfigError, match="user_connections_ttl_s"):
        config.load({"user_connections_ttl_s": "0"}, environ={})


# --------------------------------------------------------------------------- helpers


def connect_refusal(clients: NodeClients, name: str, url: str, token: str) -> dict[str, Any]:
    """Connect, expecting a connect_error; return its ``data``."""
    with pytest.raises(ClientsError) as refused:
        clients.connect(name, url, token)
    text = str(refused.value)
    start = text.index('{"code"')
    data, _ = json.JSONDecoder().raw_decode(text[start:])
    assert isinstance(data, dict)
    return data


def connects_eventually(
    clients: NodeClients, name: str, url: str, token: str, *, timeout: float
) -> int:
    """Connect ``name`` (``name-1``, ``name-2``, ... while refused); return the attempts."""
    deadline = time.monotonic() + timeout
    for attempt in range(1, 10_000):
        try:
            clients.connect(f"{name}-{attempt}", url, token)
        except ClientsError as error:
            assert "rate_limited" in str(error), error
            assert time.monotonic() < deadline, f"{name} refused for {timeout}s"
            time.sleep(0.05)
            continue
        return attempt
    raise AssertionError("unreachable")


def rate_limited(server: RoomcastServer, limit: str) -> float:
    return metric(server, f'roomcast_rate_limited_total{{limit="{limit}"}}')


def events_named(clients: NodeClients, name: str, event: str) -> list[Any]:
    return [e["data"] for e in clients.state(name)["events"] if e["event"] == event]


# --------------------------------------------------------------------------- per socket


@pytest.mark.interop
def test_event_rate_refuses_then_recovers_then_disconnects(
    gateways: GatewayFactory, node_clients: NodeClients, mint: Mint
) -> None:
    """Over its event burst a socket's acks say rate_limited with a retry-after; after that
    time it is served again; events without an ack are dropped and counted; a socket that
    floods far over its limit gets roomcast:disconnect rate_limited and is disconnected."""
    (server,) = gateways(1, "--event-rate", "1", "--event-burst", "5")
    node_clients.connect("c", server.url, mint("ann"))
    answers = [node_clients.emit("c", "leave", "doc:1") for _ in range(5)]
    assert answers == [[{"ok": True}]] * 5
    accepted = 5
    while True:
        (answer,) = node_clients.emit("c", "leave", "doc:1")
        if not answer["ok"]:
            break
        accepted += 1
        assert accepted < 10, "the bucket never ran out"
    error = answer["error"]
    assert (error["code"], error["limit"]) == ("rate_limited", "events")
    assert 0 < error["retry_after_ms"] <= 1000
    refused_before = rate_limited(server, "events")

    time.sleep(error["retry_after_ms"] / 1000)  # the refill, as the ack told
    assert node_clients.emit("c", "leave", "doc:1") == [{"ok": True}]

    node_clients.send("c", "leave", "doc:1")  # no ack: the bucket is empty again
    wait_until(
        lambda: rate_limited(server, "events") > refused_before,
        timeout=5,
        what="the drop of an event without an ack to be counted",
    )

    node_clients.send("c", "leave", "doc:1", count=200)
    assert node_clients.wait_disconnects("c", 1) == ["io server disconnect"]
    (notice,) = events_named(node_clients, "c", "roomcast:disconnect")
    assert notice["code"] == "rate_limited"
    wait_until(
        lambda: metric(server, 'roomcast_disconnects_total{reason="rate_limited"}') == 1,
        timeout=5,
        what="the disconnect to be counted",
    )
    node_clients.connect("again", server.url, mint("ann"))  # a new socket, a full bucket
    assert node_clients.emit("again", "leave", "doc:1") == [{"ok": True}]


@pytest.mark.interop
def test_join_rate_and_rooms_per_socket(
    gateways: GatewayFactory, node_clients: NodeClients, mint: Mint
) -> None:
    """Joins have their own bucket (rate_limited, limit joins, with a retry-after), beside the
    rooms-per-socket cap (too_many_rooms); both are counted by limit, and both recover."""
    (server,) = gateways(1, "--join-rate", "1", "--join-burst", "3", "--max-rooms-per-socket", "2")
    node_clients.connect("c", server.url, mint("ann"))
    node_clients.join("c", "doc:1")
    node_clients.join("c", "doc:2")
    (full,) = node_clients.emit("c", "join", "doc:3")
    assert full["error"]["code"] == "too_many_rooms"
    (limited,) = node_clients.emit("c", "join", "doc:3")
    if limited["ok"] is False and limited["error"]["code"] == "too_many_rooms":
        (limited,) = node_clients.emit("c", "join", "doc:3")  # a token came back meanwhile
    error = limited["error"]
    assert (error["code"], error["limit"]) == ("rate_limited", "joins")
    assert node_clients.emit("c", "leave", "doc:1") == [{"ok": True}]  # leaves are not joins
    time.sleep(error["retry_after_ms"] / 1000)
    node_clients.join("c", "doc:3")
    assert rate_limited(server, "joins") >= 1
    assert rate_limited(server, "rooms") >= 1


# --------------------------------------------------------------------------- per user


@pytest.mark.interop
@pytest.mark.redis
def test_connections_per_user_across_two_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A user's connections count on every instance: over the cap a connect gets
    connect_error rate_limited (limit user_connections) on either; a close frees a slot; the
    connections of an instance that dies free theirs once their TTL passes."""
    ttl = 3.0
    args = ("--max-connections-per-user", "2", "--user-connections-ttl-s", str(ttl))
    first, second = gateways(2, *redis_args(redis_url, redis_prefix, *args))
    token = mint("ann")
    node_clients.connect("a", first.url, token)
    node_clients.connect("b", second.url, token)
    for index, server in enumerate((first, second)):
        data = connect_refusal(node_clients, f"refused{index}", server.url, token)
        assert (data["code"], data["limit"]) == ("rate_limited", "user_connections")
        assert data["retry_after_ms"] > 0
    node_clients.connect("bob", first.url, mint("bob"))  # another user is not limited

    node_clients.close_client("a")
    connects_eventually(node_clients, "after-close", first.url, token, timeout=5)
    assert rate_limited(first, "user_connections") >= 1

    second.kill()  # b's hold stays in Redis, kept alive by nobody
    killed = time.monotonic()
    data = connect_refusal(node_clients, "before-ttl", first.url, token)
    assert data["limit"] == "user_connections"
    attempts = connects_eventually(node_clients, "after-ttl", first.url, token, timeout=ttl + 5)
    print(
        f"a dead instance's connection freed after {time.monotonic() - killed:.2f} s "
        f"({attempts} attempts, TTL {ttl} s)"
    )


@pytest.mark.interop
@pytest.mark.redis
def test_new_connections_per_user_across_two_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """New connections of a user are counted per window on every instance together: over the
    count a connect is refused with the time left in the window, and admitted after it."""
    args = ("--user-connect-rate", "3", "--user-connect-window-s", "2")
    servers = gateways(2, *redis_args(redis_url, redis_prefix, *args))
    token = mint("ann")
    for index in range(3):
        node_clients.connect(f"c{index}", servers[index % 2].url, token)
    data = connect_refusal(node_clients, "refused", servers[1].url, token)
    assert (data["code"], data["limit"]) == ("rate_limited", "user_connect_rate")
    assert 0 < data["retry_after_ms"] <= 2000
    time.sleep(data["retry_after_ms"] / 1000)  # the window's end, as told
    connects_eventually(node_clients, "next-window", servers[0].url, token, timeout=5)
    assert rate_limited(servers[1], "user_connect_rate") == 1


@pytest.mark.redis
async def test_admit_on_a_redis_cluster(redis_cluster_url: str, redis_prefix: str) -> None:
    """On a cluster the admit script runs in the user's slot (both keys share the hash tag)."""
    broker = RedisBroker(redis_cluster_url, prefix=redis_prefix)
    quota = UserQuota(per_window=10, window_ms=60_000, concurrent=1, ttl_ms=60_000)
    try:
        for user in ("ann", "bob", "{odd}", "x}y{z"):
            assert await broker.admit_user(user, "m1", quota) == Admission()
            assert (await broker.admit_user(user, "m2", quota)).limit == "user_connections"
        await broker.keep_users([("ann", "m1"), ("bob", "m1")], 60_000)
        await broker.release_users([("ann", "m1"), ("bob", "m1")])
        assert await broker.admit_user("ann", "m2", quota) == Admission()
    finally:
        await broker.stop()


# --------------------------------------------------------------------------- publish API


def post_publish(server: RoomcastServer, key: str) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"room": "doc:1", "event": "e", "data": 1}).encode()
    request = urllib.request.Request(
        f"{server.url}/api/v1/publish",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), json.loads(error.read())


def test_publish_api_answers_429_then_recovers(gateways: GatewayFactory) -> None:
    """Over its burst the publish API answers 429 rate_limited with Retry-After and
    retry_after_ms; after that time it accepts again; a wrong key is refused before the
    limit and takes nothing from it."""
    (server,) = gateways(1, "--api-rate", "1", "--api-burst", "2")
    key = server.credentials.api_key
    assert post_publish(server, "wrong")[0] == 401
    statuses = [post_publish(server, key)[0] for _ in range(2)]
    assert statuses == [202, 202]
    status, headers, body = post_publish(server, key)
    if status == 202:  # a token came back meanwhile
        status, headers, body = post_publish(server, key)
    assert status == 429
    error = body["error"]
    assert (error["code"], error["limit"]) == ("rate_limited", "api")
    assert 0 < error["retry_after_ms"] <= 1000
    assert int(headers["Retry-After"]) == 1
    time.sleep(error["retry_after_ms"] / 1000)
    assert post_publish(server, key)[0] == 202
    assert rate_limited(server, "api") >= 1


async def test_a_client_that_ignores_the_disconnect_loses_its_connection() -> None:
    """A raw client kicked for flooding that keeps its connection open and keeps sending has
    the connection closed after the grace, counted as rate_limited_linger."""
    async with running(event_rate=1, event_burst=2) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        connected = await raw.recv()
        assert isinstance(connected, str) and connected.startswith("40{"), connected
        flood = '42["leave","doc:1"]'
        for _ in range(100):
            await raw.send(flood)

        async def keep_sending() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await raw.send(flood)
                    await asyncio.sleep(0.01)

        sender = asyncio.create_task(keep_sending())
        try:
            assert await raw.closed(timeout=5 + KICK_GRACE_S)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        disconnects = node.metrics.disconnects
        assert disconnects.labels("rate_limited")._value.get() == 1
        assert disconnects.labels("rate_limited_linger")._value.get() == 1


async def test_a_connect_refused_after_admission_holds_no_place() -> None:
    """A connect that the user limits admitted but the application refused gives its place
    back at once, as does a socket that disconnects: the user's next connect is admitted."""
    app = Application()

    @app.before_connect()
    async def picky(socket: Socket, auth: dict[str, object]) -> None:
        if auth.get("refuse"):
            raise ConnectRefusedError("not today")

    async with running(app, max_connections_per_user=1) as node:
        token = token_for("doc:*")
        refused = await connect_sio(node.port, {"token": token, "refuse": True})
        answer = str(await refused.recv())
        assert json.loads(answer[2:])["data"]["code"] == "forbidden", answer
        first = await connect_sio(node.port, {"token": token})
        assert str(await first.recv()).startswith("40{")
        second = await connect_sio(node.port, {"token": token})
        answer = str(await second.recv())
        assert json.loads(answer[2:])["data"]["limit"] == "user_connections", answer
        await first.send("41")  # the client leaves the namespace: its place frees
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            again = await connect_sio(node.port, {"token": token})
            if str(await again.recv()).startswith("40{"):
                break
            assert asyncio.get_running_loop().time() < deadline, "the place never came back"
            await asyncio.sleep(0.01)
