"""Several ``roomcast serve`` instances sharing one Redis, driven by the official socket.io-client.

Every test starts its own instances with a key prefix no other test uses. Waits have deadlines;
"nothing else arrived" is checked with a marker published after the traffic under test: the
broker delivers a room's publications in stream order, so once a later marker is in, anything
that was going to arrive before it has.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import multi_fixtures
import pytest
import redis
from multi_fixtures import (
    NodeClients,
    ProxyFactory,
    TcpProxy,
    metric,
    publish,
    publish_ok,
    readyz,
    redis_args,
    room_key,
    xadd_publication,
)

import redis_fixtures
from redis_fixtures import RedisServer, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Mint, RoomcastServer
    from multi_fixtures import GatewayFactory

pytestmark = [pytest.mark.redis, pytest.mark.interop]

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
redis_server_factory = redis_fixtures.redis_server_factory
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients
tcp_proxy = multi_fixtures.tcp_proxy

ROOMS = ("mi:**",)
"""What every test token may join."""


def _payloads(events: list[dict[str, Any]]) -> list[Any]:
    return [(e["event"], e["data"]) for e in events]


def _readiness(server: RoomcastServer) -> tuple[int, Any, Any]:
    """``/readyz`` as (status, ready, broker)."""
    status, body = readyz(server)
    return status, body.get("ready"), body.get("broker")


def _wait_readiness(server: RoomcastServer, wanted: tuple[int, bool, str], timeout: float) -> None:
    wait_until(
        lambda: _readiness(server) == wanted,
        timeout=timeout,
        what=f"{server.url}/readyz to answer (status, ready, broker) = {wanted}",
    )


def _offsets_increase(events: list[dict[str, Any]]) -> bool:
    keys = [tuple(int(part) for part in e["offset"].split("-")) for e in events]
    return all(a < b for a, b in itertools.pairwise(keys))


# --------------------------------------------------------------------------- fan-out


def test_fan_out_across_three_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Every member of a room on every instance gets each publication (HTTP or plain XADD) once, in order, and members of another room get none of them."""
    servers = gateways(3, *redis_args(redis_url, redis_prefix))
    room, other = "mi:fan:r", "mi:fan:s"
    members, outsiders = [], []
    for index in range(9):
        name = f"c{index}"
        server = servers[index % 3]
        # Mixed transports: websocket-only, and polling upgraded to websocket.
        options = {"transports": ["websocket"]} if index % 2 else {}
        node_clients.connect(name, server.url, mint(f"user-{index}", rooms=ROOMS), **options)
        if index < 6:
            node_clients.join(name, room)
            members.append(name)
        else:
            node_clients.join(name, other)
            outsiders.append(name)

    count = 50
    expected: list[tuple[str, Any]] = []
    offsets: list[str] = []
    for n in range(count):
        body = publish_ok(servers[0], room, "tick", {"n": n, "via": "http"})
        expected.append(("tick", {"n": n, "via": "http"}))
        offsets.append(body["offset"])
    raw = redis.Redis.from_url(redis_url)
    try:
        for n in range(count):
            offsets.append(
                xadd_publication(raw, redis_prefix, room, "tick", {"n": n, "via": "xadd"})
            )
            expected.append(("tick", {"n": n, "via": "xadd"}))
    finally:
        raw.close()
    # Markers: the last publication of each room.
    publish_ok(servers[0], room, "end", "r")
    publish_ok(servers[0], other, "end", "s")
    expected.append(("end", "r"))

    for name in members:
        events = node_clients.wait_events(name, until="end")
        assert _payloads(events) == expected, f"{name}: wrong, missing or repeated events"
        assert [e["offset"] for e in events[:-1]] == offsets, name
        assert _offsets_increase(events), name
    for name in outsiders:
        events = node_clients.wait_events(name, until="end")
        assert _payloads(events) == [("end", "s")], f"{name} got another room's events"
    for name in members + outsiders:
        state = node_clients.state(name)
        assert state["disconnects"] == [], (name, state["disconnects"])


# --------------------------------------------------------------------------- interest


def test_instance_receives_only_rooms_it_has_members_for(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """An instance fans out only the publications of rooms it has local members for: one without members of a room gets 0 broadcasts of that room's traffic."""
    servers = gateways(3, *redis_args(redis_url, redis_prefix))
    # Which instances have members of which room: "a" on 1, "b" on 2, "c" on 3, "ab" on 1 and 2.
    placement = {"mi:int:a": (0,), "mi:int:b": (1,), "mi:int:c": (2,), "mi:int:ab": (0, 1)}
    for room, where in placement.items():
        for index in where:
            name = f"{room}@{index}"
            node_clients.connect(name, servers[index].url, mint(name, rooms=ROOMS))
            node_clients.join(name, room)
    before = [metric(s, "roomcast_broadcasts_total") for s in servers]

    per_room = 20
    raw = redis.Redis.from_url(redis_url)
    try:
        for n in range(per_room):
            for room in placement:
                # Half through the HTTP API of an instance that has no members, half raw.
                if n % 2:
                    publish_ok(servers[2], room, "tick", n)
                else:
                    xadd_publication(raw, redis_prefix, room, "tick", n)
    finally:
        raw.close()
    for room, where in placement.items():
        for index in where:
            events = node_clients.wait_events(f"{room}@{index}", per_room)
            assert [e["data"] for e in events] == list(range(per_room)), (room, index)

    # Markers for each instance's own room: anything of another room delivered to an instance
    # would have been fetched in the same or an earlier round than its marker.
    for room, only in (("mi:int:a", 0), ("mi:int:b", 1), ("mi:int:c", 2)):
        publish_ok(servers[only], room, "end", None)
        node_clients.wait_events(f"{room}@{only}", until="end")
    received = [
        metric(s, "roomcast_broadcasts_total") - b for s, b in zip(servers, before, strict=True)
    ]
    expected = [
        sum(
            per_room + (room in ("mi:int:a", "mi:int:b", "mi:int:c"))
            for room, where in placement.items()
            if index in where
        )
        for index in range(3)
    ]
    published = per_room * len(placement) + 3
    figure = (
        f"inbound broadcasts per instance (of {published} publications in 4 rooms): "
        + ", ".join(f"instance {i + 1}: {int(n)}" for i, n in enumerate(received))
        + f"; expected {expected}"
    )
    print(f"\n[figure] {figure}")
    assert received == expected, figure
    # Instance 3 has no member of "a", "b" or "ab": it fanned out only its own room's traffic.
    assert received[2] == per_room + 1, figure

    # Redis' view: one keyspace subscription per instance with members of the room.
    raw = redis.Redis.from_url(redis_url)
    try:

        def subscribers(room: str) -> int:
            channel = f"__keyspace@0__:{room_key(redis_prefix, room)}"
            return int(dict(raw.pubsub_numsub(channel))[channel.encode()])

        assert {room: subscribers(room) for room in placement} == {
            room: len(where) for room, where in placement.items()
        }
        # The last member of "ab" on instance 2 leaves: instance 2 stops receiving "ab".
        assert node_clients.emit("mi:int:ab@1", "leave", "mi:int:ab") == [{"ok": True}]
        wait_until(lambda: subscribers("mi:int:ab") == 1, timeout=5, what="the unsubscribe")
    finally:
        raw.close()
    before_leave = metric(servers[1], "roomcast_broadcasts_total")
    publish_ok(servers[0], "mi:int:ab", "after-leave", None)
    node_clients.wait_events("mi:int:ab@0", until="after-leave")
    publish_ok(servers[1], "mi:int:b", "end", "again")
    node_clients.wait_events("mi:int:b@1", per_room + 2)
    assert metric(servers[1], "roomcast_broadcasts_total") - before_leave == 1
    assert node_clients.state("mi:int:ab@1")["events"][per_room:] == []


# --------------------------------------------------------------------------- client publish


def test_client_publish_reaches_other_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A client's publish reaches members on the other instances but not the sender, and a sender without publish rights is refused with nothing delivered."""
    a, b, c = gateways(3, *redis_args(redis_url, redis_prefix))
    room = "mi:pub:r"
    node_clients.connect("sender", a.url, mint("sender", rooms=ROOMS, publish=("mi:pub:*",)))
    node_clients.connect("mute", a.url, mint("mute", rooms=ROOMS, publish=("mi:other:*",)))
    node_clients.connect("on-b", b.url, mint("on-b", rooms=ROOMS))
    node_clients.connect("on-c", c.url, mint("on-c", rooms=ROOMS), transports=["websocket"])
    for name in ("sender", "mute", "on-b", "on-c"):
        node_clients.join(name, room)

    [ack] = node_clients.emit(
        "sender", "publish", {"room": room, "event": "said", "data": {"t": 1}}
    )
    assert ack["ok"] is True and isinstance(ack["id"], str), ack
    [refused] = node_clients.emit(
        "mute", "publish", {"room": room, "event": "said", "data": {"t": 2}}
    )
    assert refused["ok"] is False, refused
    assert refused["error"]["code"] == "forbidden", refused
    raw = redis.Redis.from_url(redis_url)
    try:
        assert raw.xlen(room_key(redis_prefix, room)) == 1, "the refused publish was appended"
    finally:
        raw.close()
    publish_ok(c, room, "end", None)

    for name in ("on-b", "on-c", "mute"):
        events = node_clients.wait_events(name, until="end")
        assert _payloads(events) == [("said", {"t": 1}), ("end", None)], name
    events = node_clients.wait_events("sender", until="end")
    assert _payloads(events) == [("end", None)], "the sender received its own publication"


# --------------------------------------------------------------------------- idempotency


def test_idempotent_publish_across_instances(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """One idempotency key published through two instances (or appended twice by plain XADD) is delivered once, and the second answer names the first publication."""
    one, two = gateways(2, *redis_args(redis_url, redis_prefix))
    room = "mi:idem:r"
    for index, server in enumerate((one, two)):
        node_clients.connect(f"m{index}", server.url, mint(f"m{index}", rooms=ROOMS))
        node_clients.join(f"m{index}", room)

    status, first = publish(one, room, "order", {"n": 1}, idempotency_key="order-7")
    assert status == 202, first
    assert "duplicate" not in first, first
    status, second = publish(two, room, "order", {"n": 2}, idempotency_key="order-7")
    assert status == 200, second
    assert second["duplicate"] is True, second
    assert (second["id"], second["offset"]) == (first["id"], first["offset"]), (first, second)
    # Plain XADDs carrying one idempotency key: every instance delivers only the first entry.
    raw = redis.Redis.from_url(redis_url)
    try:
        key = room_key(redis_prefix, room)
        for n in (3, 4):
            fields = {
                "room": room,
                "event": "order",
                "data": json.dumps({"n": n}),
                "id": uuid.uuid4().hex,
                "published_at": str(int(time.time() * 1000)),
                "idempotency_key": "order-8",
            }
            raw.xadd(key, fields)  # type: ignore[arg-type]
    finally:
        raw.close()
    publish_ok(two, room, "end", None)

    for name in ("m0", "m1"):
        events = node_clients.wait_events(name, until="end")
        assert _payloads(events) == [("order", {"n": 1}), ("order", {"n": 3}), ("end", None)], name
        assert events[0]["offset"] == first["offset"], name


# --------------------------------------------------------------------------- recovery

RECONNECTING = {
    "transports": ["websocket"],
    "reconnection": True,
    "reconnectionDelay": 50,
    "reconnectionDelayMax": 200,
    "randomizationFactor": 0,
}
"""A websocket-only client that reconnects quickly (and keeps trying while the proxy refuses)."""


def _move(
    clients: NodeClients,
    proxy: TcpProxy,
    name: str,
    target: RoomcastServer,
    while_away: Callable[[], None],
    *,
    cut: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Cut ``name`` off (``cut``, by default a proxy drop), send the proxy to ``target``, run ``while_away``, let the client back in; return its new connect record."""
    before = clients.state(name)
    proxy.pause()
    if cut is None:
        proxy.drop_all()  # a long-polling client may have no connection open right now
    else:
        cut()
    clients.wait_disconnects(name, len(before["disconnects"]) + 1)
    proxy.retarget(target.port)
    while_away()
    proxy.resume()
    return clients.wait_connects(name, len(before["connects"]) + 1)[-1]


def _publish_range(
    server: RoomcastServer, room: str, start: int, stop: int, offsets: list[str] | None = None
) -> Callable[[], None]:
    """A callable publishing ``tick`` ``start`` .. ``stop - 1``; their offsets go to ``offsets``."""

    def run() -> None:
        for n in range(start, stop):
            body = publish_ok(server, room, "tick", n)
            if offsets is not None:
                offsets.append(body["offset"])

    return run


@pytest.mark.parametrize(
    ("cut", "transport"),
    [("drop", "websocket"), ("drop", "polling"), ("kill", "websocket"), ("drain", "websocket")],
)
def test_recovery_on_another_instance(
    cut: str,
    transport: str,
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A client cut off from instance A (connection dropped, A killed, or A drained by SIGTERM) recovers on instance B: same socket id, every missed event once and in order, then live events."""
    a, b = gateways(2, *redis_args(redis_url, redis_prefix))
    room = "mi:rec:r"
    proxy = tcp_proxy(a.port)
    options = {**RECONNECTING, "transports": [transport]}
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **options)
    assert first["recovered"] is False
    node_clients.join("roamer", room)
    _publish_range(a, room, 0, 3)()
    node_clients.wait_events("roamer", 3)

    missed = 10
    again = _move(
        node_clients,
        proxy,
        "roamer",
        b,
        _publish_range(b, room, 3, 3 + missed),
        cut={"drop": None, "kill": a.kill, "drain": a.stop}[cut],
    )
    assert again["recovered"] is True, again
    assert again["id"] == first["id"], (first, again)
    _publish_range(b, room, 3 + missed, 3 + missed + 3)()
    publish_ok(b, room, "end", None)
    total = 3 + missed + 3
    events = node_clients.wait_events("roamer", until="end")
    assert _payloads(events) == [("tick", n) for n in range(total)] + [("end", None)]
    assert _offsets_increase(events)
    assert again["transport"] == transport


def test_recovery_window_expired(
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A client away longer than --recovery-max-disconnection-ms comes back as a new session, with no replay."""
    a, b = gateways(
        2, *redis_args(redis_url, redis_prefix, "--recovery-max-disconnection-ms", "1000")
    )
    room = "mi:expire:r"
    proxy = tcp_proxy(a.port)
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **RECONNECTING)
    node_clients.join("roamer", room)
    _publish_range(a, room, 0, 2)()
    node_clients.wait_events("roamer", 2)
    raw = redis.Redis.from_url(redis_url)

    def away() -> None:
        _publish_range(b, room, 2, 5)()
        wait_until(
            lambda: not list(raw.scan_iter(match=f"{redis_prefix}:session:*")),
            timeout=5,
            what="the recovery state to expire",
        )

    try:
        again = _move(node_clients, proxy, "roamer", b, away)
    finally:
        raw.close()
    assert again["recovered"] is False, again
    assert again["id"] != first["id"], again
    node_clients.join("roamer", room)
    publish_ok(b, room, "end", None)
    events = node_clients.wait_events("roamer", until="end")
    assert _payloads(events) == [("tick", 0), ("tick", 1), ("end", None)]


def test_recovery_success_rate(
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Ten drop/reconnect cycles, each onto the other instance, all recover the session with exactly the missed events."""
    servers = gateways(2, *redis_args(redis_url, redis_prefix))
    room = "mi:rate:r"
    proxy = tcp_proxy(servers[0].port)
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **RECONNECTING)
    node_clients.join("roamer", room)
    cycles, per_cycle = 10, 3
    failures: list[str] = []
    published = 0
    for cycle in range(cycles):
        target = servers[(cycle + 1) % 2]
        start = len(node_clients.state("roamer")["events"])
        again = _move(
            node_clients,
            proxy,
            "roamer",
            target,
            _publish_range(target, room, published, published + per_cycle),
        )
        published += per_cycle
        publish_ok(target, room, "end", cycle)
        events = node_clients.wait_events("roamer", start + per_cycle + 1)[start:]
        wanted = [("tick", n) for n in range(published - per_cycle, published)] + [("end", cycle)]
        if not again["recovered"] or again["id"] != first["id"] or _payloads(events) != wanted:
            failures.append(f"cycle {cycle}: {again} {_payloads(events)}")
            if not again["recovered"]:
                node_clients.join("roamer", room)  # a new session: carry on measuring
    rate = (cycles - len(failures)) / cycles
    figure = f"recovery success rate: {cycles - len(failures)}/{cycles} ({rate:.0%})"
    print(f"\n[figure] {figure}")
    assert not failures, figure + "\n" + "\n".join(failures)


def test_recovery_while_publishing_continues(
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """While a publisher keeps publishing, a client hopping between instances eight times still gets every publication exactly once and in order."""
    servers = gateways(2, *redis_args(redis_url, redis_prefix))
    room = "mi:busy:r"
    cycles = 8
    proxy = tcp_proxy(servers[0].port)
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **RECONNECTING)
    node_clients.join("roamer", room)
    stop = threading.Event()
    published: list[int] = []

    def publisher() -> None:
        n = 0
        while not stop.is_set():
            publish_ok(servers[n % 2], room, "tick", n)
            published.append(n)
            n += 1
            stop.wait(0.003)  # pacing, so that two cores also serve the clients

    thread = threading.Thread(target=publisher, name="mi-publisher")
    thread.start()
    try:
        for cycle in range(cycles):
            # Receiving live events on this connection, then cut off.
            node_clients.wait_events("roamer", len(node_clients.state("roamer")["events"]) + 3)
            again = _move(node_clients, proxy, "roamer", servers[(cycle + 1) % 2], lambda: None)
            assert again["recovered"] is True and again["id"] == first["id"], (cycle, again)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert published, "the publisher thread published nothing (it failed?)"
    publish_ok(servers[0], room, "end", None)
    events = node_clients.wait_events("roamer", until="end")
    assert _payloads(events[-1:]) == [("end", None)]
    got = [e["data"] for e in events[:-1]]
    once = list(dict.fromkeys(got))
    missing = sorted(set(published) - set(got))
    assert once == published, f"{len(published)} published; missing {missing}; got {got}"
    repeated = [
        f"tick {e['data']} (offset {e['offset']}, Engine.IO session {e['engine']})"
        for e in events
        if got.count(e["data"]) > 1
    ]
    assert not repeated, f"delivered twice: {repeated}"


def test_recovery_skips_own_publication_and_covers_two_rooms(
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A client in two rooms recovers on another instance with the missed events of both rooms, each room in order, without its own publication."""
    a, b = gateways(2, *redis_args(redis_url, redis_prefix))
    rooms = ("mi:two:r", "mi:two:s")
    proxy = tcp_proxy(a.port)
    token = mint("roamer", rooms=ROOMS, publish=("mi:two:*",))
    first = node_clients.connect("roamer", proxy.url, token, **RECONNECTING)
    for room in rooms:
        node_clients.join("roamer", room)
    publish_ok(a, rooms[0], "tick", "r0")
    publish_ok(a, rooms[1], "tick", "s0")
    node_clients.wait_events("roamer", 2)
    [ack] = node_clients.emit("roamer", "publish", {"room": rooms[0], "event": "own", "data": 1})
    assert ack["ok"] is True, ack

    def while_away() -> None:
        for n in range(1, 4):
            publish_ok(b, rooms[0], "tick", f"r{n}")
            publish_ok(a, rooms[1], "tick", f"s{n}")

    again = _move(node_clients, proxy, "roamer", b, while_away)
    assert again["recovered"] is True and again["id"] == first["id"], again
    publish_ok(b, rooms[1], "end", None)
    events = node_clients.wait_events("roamer", until="end")
    got = [e["data"] for e in events]
    # Order is kept per room (offsets of two streams do not order publications between them).
    assert [d for d in got if str(d).startswith("r")] == ["r0", "r1", "r2", "r3"], got
    assert [d for d in got if str(d).startswith("s")] == ["s0", "s1", "s2", "s3"], got
    assert got[-1] is None and len(got) == 9, got
    assert "own" not in [e["event"] for e in events], got


@pytest.mark.parametrize("quiet_room_gets", ["nothing", "its first publication"])
def test_recovery_with_a_room_without_history(
    quiet_room_gets: str,
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A client in a busy room and in a room without history (never published to, or first published to while the client is away) recovers with every missed event."""
    a, b = gateways(2, *redis_args(redis_url, redis_prefix))
    busy, quiet = "mi:new:busy", "mi:new:quiet"
    proxy = tcp_proxy(a.port)
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **RECONNECTING)
    node_clients.join("roamer", busy)
    node_clients.join("roamer", quiet)
    _publish_range(a, busy, 0, 2)()
    node_clients.wait_events("roamer", 2)
    missed = ["2", "3"]

    def while_away() -> None:
        if quiet_room_gets != "nothing":
            publish_ok(b, quiet, "tick", "first in quiet")
            missed.append("first in quiet")
        _publish_range(b, busy, 2, 4)()

    again = _move(node_clients, proxy, "roamer", b, while_away)
    assert again["recovered"] is True and again["id"] == first["id"], again
    publish_ok(b, busy, "end", None)
    events = node_clients.wait_events("roamer", until="end")
    assert sorted(str(e["data"]) for e in events[2:-1]) == sorted(missed)


def test_recovery_after_cross_room_delivery_order(
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """A client in several rooms that received two rooms' publications in an order other than their offsets' still recovers each publication exactly once."""
    a, b = gateways(2, *redis_args(redis_url, redis_prefix))
    proxy = tcp_proxy(a.port)
    node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **RECONNECTING)
    pairs = [(f"mi:cross:{k}:x", f"mi:cross:{k}:y") for k in range(8)]
    for pair in pairs:
        for room in pair:
            node_clients.join("roamer", room)
            publish_ok(a, room, "seed", None)  # every room has history before what follows
    seen = len(node_clients.wait_events("roamer", 2 * len(pairs)))
    raw = redis.Redis.from_url(redis_url)
    inverted = None
    try:
        for first_room, second_room in pairs:
            # One transaction, two rooms, consecutive ids: the instance is woken for both at once.
            now = int(time.time() * 1000) + 1  # past every id the room has (its seed)
            with raw.pipeline(transaction=True) as pipe:
                for room, entry_id in ((first_room, f"{now}-0"), (second_room, f"{now + 1}-0")):
                    fields = {
                        "room": room,
                        "event": "tick",
                        "data": json.dumps(room),
                        "id": uuid.uuid4().hex,
                        "published_at": str(now),
                    }
                    pipe.xadd(room_key(redis_prefix, room), fields, id=entry_id)  # type: ignore[arg-type]
                pipe.execute()
            seen += 2
            events = node_clients.wait_events("roamer", seen)
            if [e["data"] for e in events[-2:]] == [second_room, first_room]:
                inverted = [(e["data"], e["offset"]) for e in events[-2:]]
                break
    finally:
        raw.close()
    # Without an inversion (delivery in offset order) there is nothing to replay either.
    again = _move(node_clients, proxy, "roamer", b, lambda: None)
    assert again["recovered"] is True, again
    publish_ok(b, pairs[0][0], "end", None)
    events = node_clients.wait_events("roamer", until="end")
    replayed = [(e["data"], e["offset"]) for e in events[seen:-1]]
    assert replayed == [], f"received {inverted} (in this order), then after recovery: {replayed}"


@pytest.mark.parametrize(
    "case",
    [
        "untrimmed",
        "trimmed",
        "trimmed-after-xdel",
    ],
)
def test_recovery_never_replays_partial_history(
    case: str,
    gateways: GatewayFactory,
    tcp_proxy: ProxyFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """With --history-size 5 and 20 publications while away, a reconnect either replays all 20 (nothing was trimmed) or reports recovered false (history trimmed), never a partial replay."""
    # MAXLEN ~ trims whole stream nodes only (100 entries by default), so only a server with
    # small nodes really loses the history.
    if case == "untrimmed":
        url = redis_url
    else:
        url = redis_server_factory("--stream-node-max-entries", "5").url
    a, b = gateways(2, *redis_args(url, redis_prefix, "--history-size", "5"))
    room = "mi:trim:r"
    proxy = tcp_proxy(a.port)
    first = node_clients.connect("roamer", proxy.url, mint("roamer", rooms=ROOMS), **RECONNECTING)
    node_clients.join("roamer", room)
    seen: list[str] = []
    _publish_range(a, room, 0, 3, seen)()
    node_clients.wait_events("roamer", 3)
    raw = redis.Redis.from_url(url)
    try:
        if case == "trimmed-after-xdel":
            # An operator deletes one old publication, one every client has already seen.
            assert raw.xdel(room_key(redis_prefix, room), seen[0]) == 1
        away: list[str] = []
        again = _move(node_clients, proxy, "roamer", b, _publish_range(b, room, 3, 23, away))
        # Trimmed: the first publication the client missed is gone from the stream.
        trimmed = not raw.xrange(room_key(redis_prefix, room), away[0], away[0])
    finally:
        raw.close()
    assert trimmed is (case != "untrimmed")
    publish_ok(b, room, "end", None)
    if trimmed:
        replayed = _payloads(node_clients.state("roamer")["events"])
        assert again["recovered"] is False, f"recovered {again} with a partial replay: {replayed}"
        assert again["id"] != first["id"], again
        node_clients.join("roamer", room)
        publish_ok(b, room, "end", "rejoined")
        events = node_clients.wait_events("roamer", 4)
        assert _payloads(events) == [("tick", 0), ("tick", 1), ("tick", 2), ("end", "rejoined")]
    else:
        assert again["recovered"] is True, again
        assert again["id"] == first["id"], again
        events = node_clients.wait_events("roamer", 24)
        assert _payloads(events) == [("tick", n) for n in range(23)] + [("end", None)]


# --------------------------------------------------------------------------- redis outage


def test_redis_outage_loses_nothing(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_prefix: str,
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Clients stay connected through a Redis restart, the instances report unready and refuse publishes meanwhile, and every event appended after the restart (even before the instances are back) arrives exactly once."""
    server = redis_server_factory()
    a, b = gateways(2, *redis_args(server.url, redis_prefix))
    room, late_room = "mi:out:r", "mi:out:late"
    names = []
    for index, gateway in enumerate((a, a, b, b)):
        name = f"c{index}"
        options = {"transports": ["websocket"]} if index % 2 else {"transports": ["polling"]}
        token = mint(name, rooms=ROOMS, publish=("mi:out:*",))
        node_clients.connect(name, gateway.url, token, **options)
        node_clients.join(name, room)
        names.append(name)
    for n in range(5):
        publish_ok(a, room, "tick", n)
    for name in names:
        node_clients.wait_events(name, 5)

    server.kill()
    for gateway in (a, b):
        _wait_readiness(gateway, (503, False, "disconnected"), timeout=10)
    status, body = publish(a, room, "tick", -1)
    assert status == 503, body
    assert body["error"]["code"] == "broker_unavailable", body
    [refused] = node_clients.emit("c2", "publish", {"room": room, "event": "tick", "data": -2})
    assert refused["ok"] is False and refused["error"]["code"] == "unavailable", refused
    # A first member of a new room joins during the outage (the room is subscribed on reconnect).
    node_clients.connect("late", b.url, mint("late", rooms=ROOMS))
    node_clients.join("late", late_room)

    server.start()  # the same port, and an empty dataset
    raw = redis.Redis(port=server.port)
    try:
        for n in range(5, 15):  # right after the restart, before Roomcast is back
            xadd_publication(raw, redis_prefix, room, "tick", n)
    finally:
        raw.close()
    back_already = [_readiness(g)[0] == 200 for g in (a, b)]
    for gateway in (a, b):
        _wait_readiness(gateway, (200, True, "connected"), timeout=15)
    for n in range(15, 25):
        publish_ok((a, b)[n % 2], room, "tick", n)
        publish_ok((a, b)[n % 2], late_room, "tick", n)
    publish_ok(b, room, "end", None)
    publish_ok(a, late_room, "end", None)

    wanted = list(range(25))
    lost: dict[str, int] = {}
    received: dict[str, list[Any]] = {}
    for name in names:
        events = node_clients.wait_events(name, until="end", timeout=15)
        received[name] = [e["data"] for e in events if e["event"] == "tick"]
        lost[name] = len(set(wanted) - set(received[name]))
    figure = (
        f"events lost during the redis restart: {sum(lost.values())} (per client {lost}; "
        f"instances already back when the raw XADDs were done: {back_already})"
    )
    print(f"\n[figure] {figure}")
    for name in names:
        assert received[name] == wanted, f"{name}: {figure}; got {received[name]}"
        assert node_clients.state(name)["disconnects"] == [], name
    late = node_clients.wait_events("late", until="end")
    assert [e["data"] for e in late] == [*range(15, 25), None]
    assert node_clients.state("late")["disconnects"] == []


# --------------------------------------------------------------------------- upstream


def test_upstream_event_acked_once_stored(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_prefix: str,
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """A configured upstream event is acked with its entry id once it is in the upstream stream with the token's user id, and with an error while Redis is down."""
    server = redis_server_factory()
    [gateway] = gateways(1, *redis_args(server.url, redis_prefix, "--upstream-events", "chat"))
    connected = node_clients.connect("talker", gateway.url, mint("user-42", rooms=ROOMS))
    raw = redis.Redis(port=server.port, decode_responses=True)
    try:
        [ack] = node_clients.emit("talker", "chat", {"text": "hi"})
        assert ack["ok"] is True and isinstance(ack["id"], str), ack
        entries = cast(
            "list[tuple[str, dict[str, str]]]",
            raw.xrange(f"{redis_prefix}:upstream", ack["id"], ack["id"]),
        )
    finally:
        raw.close()
    assert len(entries) == 1, f"acked entry {ack['id']} is not in the stream"
    fields = entries[0][1]
    assert fields["event"] == "chat", fields
    assert fields["user_id"] == "user-42", fields
    assert fields["sid"] == connected["id"], fields
    assert json.loads(fields["data"]) == {"text": "hi"}, fields

    server.kill()
    [refused] = node_clients.emit("talker", "chat", {"text": "lost?"})
    assert refused["ok"] is False, refused
    assert refused["error"]["code"] == "unavailable", refused
