"""A rolling restart behind Debian's HAProxy loses nothing.

Two instances on one Redis behind HAProxy, configured as a user would (health checks on
``/readyz`` every 500 ms, ``fall 2 rise 2``, ``timeout check 1s``, cookie stickiness for
long-polling); 1,000 official socket.io-client sockets (a tenth polling-only) in 20 rooms;
a publication per room every 250 ms through HAProxy, all along. Each instance in turn gets
SIGTERM, drains, exits and is started again; the next waits until HAProxy has it back.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import haproxy_fixtures
import multi_fixtures
import pytest
from conftest import INTEROP_DIR, http_json
from haproxy_fixtures import HAProxy
from multi_fixtures import NodeClients, redis_args

import redis_fixtures
from redis_fixtures import wait_until

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer
    from haproxy_fixtures import HAProxyFactory
    from multi_fixtures import GatewayFactory

pytestmark = [pytest.mark.redis, pytest.mark.interop]

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
gateways = multi_fixtures.gateways
haproxy = haproxy_fixtures.haproxy

INSTANCES = 2
CLIENTS = 1000
ROOMS = 20
POLLING_EVERY = 10
"""Every tenth client is polling-only; the others are WebSocket-only."""
PER_ROOM_PER_SECOND = 4
DRAIN = ("--drain-delay-s", "2", "--drain-window-s", "3", "--drain-seconds", "5")
"""Shorter than the defaults, to keep the test quick, but the delay still covers four of
HAProxy's check intervals and the window spreads each instance's clients over 3 s."""
STOP_TIMEOUT = 20.0
READYZ_EVERY = 0.1


@dataclass
class Probe:
    """What the readiness poller saw: each instance's ``/readyz`` answer times, HAProxy's
    healthy servers, while one instance (``rolling``) is restarted."""

    servers: dict[str, RoomcastServer]
    proxy: HAProxy
    rolling: str | None = None
    survivor_worst: tuple[float, str, int] = (0.0, "", 0)
    """(seconds, server, status) of the slowest answer of an instance not being restarted."""
    survivor_samples: int = 0
    survivor_failures: list[str] = field(default_factory=list)
    fewest_healthy: int = INSTANCES
    healthy_samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(READYZ_EVERY):
            rolling = self.rolling
            for name, server in self.servers.items():
                if name == rolling:
                    continue
                started = time.perf_counter()
                try:
                    status, _ = http_json("GET", f"{server.url}/readyz", timeout=2.0)
                except OSError as exc:
                    self.survivor_failures.append(f"{name}: {exc!r}")
                    continue
                elapsed = time.perf_counter() - started
                if self.rolling != rolling:  # the roll moved on meanwhile: not a survivor's
                    continue
                self.survivor_samples += 1
                if status != 200:
                    self.survivor_failures.append(f"{name}: /readyz answered {status}")
                if elapsed > self.survivor_worst[0]:
                    self.survivor_worst = (elapsed, name, status)
            healthy = len(self.proxy.healthy())
            self.healthy_samples += 1
            self.fewest_healthy = min(self.fewest_healthy, healthy)


@pytest.fixture
def crowd(node_binary: str, interop_modules: Any) -> Iterator[NodeClients]:
    clients = NodeClients(node_binary, INTEROP_DIR / "roll_clients.mjs")
    yield clients
    clients.close()


def test_a_rolling_restart_behind_haproxy_loses_nothing(
    gateways: GatewayFactory,
    haproxy: HAProxyFactory,
    crowd: NodeClients,
    redis_url: str,
    redis_prefix: str,
    mint: Mint,
) -> None:
    """Every instance restarted in turn with SIGTERM behind HAProxy: every client ends connected, every event arrives exactly once and in order, every moved client recovers, HAProxy takes each instance out on its /readyz 503 and always has one healthy, and the survivor answers /readyz promptly."""
    began = time.monotonic()
    extra = ("--trusted-proxies", "127.0.0.1", *DRAIN)
    started = gateways(INSTANCES, *redis_args(redis_url, redis_prefix, *extra))
    servers = {chr(ord("a") + index): server for index, server in enumerate(started)}
    proxy = haproxy({name: server.port for name, server in servers.items()})
    for name in servers:
        proxy.wait_status(name, "UP", timeout=10)
    token = mint("crowd", rooms=("roll:*",), ttl=3600)
    opened = crowd.call(
        "open",
        url=proxy.url,
        token=token,
        clients=CLIENTS,
        rooms=ROOMS,
        pollingEvery=POLLING_EVERY,
        timeout=120,
    )
    assert opened["connected"] == CLIENTS, opened
    crowd.call(
        "publish",
        url=proxy.url,
        apiKey=servers["a"].credentials.api_key,
        perRoomPerSecond=PER_ROOM_PER_SECOND,
    )
    probe = Probe(servers, proxy)
    poller = threading.Thread(target=probe.run, name="readyz-probe", daemon=True)
    poller.start()
    rolls: list[dict[str, Any]] = []
    roll_began = time.monotonic()
    try:
        for name, server in servers.items():
            rolls.append(_roll(name, server, proxy, probe, crowd))
    finally:
        probe.stop.set()
        poller.join(timeout=10)
    roll_seconds = time.monotonic() - roll_began
    published = crowd.call("stopPublishing", timeout=30)
    verdict = crowd.call("settle", timeoutMs=30_000, timeout=45)
    totals = verdict["totals"]
    transitions = proxy.transitions()
    worst, worst_server, worst_status = probe.survivor_worst
    print(
        f"\nrolling restart of {INSTANCES} instances behind HAProxy, {roll_seconds:.1f} s "
        f"(test {time.monotonic() - began:.1f} s)\n"
        f"clients {totals['clients']} ({totals['websocket']} websocket, {totals['polling']} "
        f"polling), connected at the end {totals['connected']}, connected in "
        f"{opened['ms'] / 1000:.1f} s\n"
        f"moved {totals['moved']} clients ({totals['moves']} moves), not recovered "
        f"{totals['movedNotRecovered']}, socket id changed {totals['idChanged']}, "
        f"connect errors {totals['connectErrors']}, disconnects {totals['disconnects']}\n"
        f"published {totals['published']} events ({published['retries']} retried requests: "
        f"{published['failures']}); expected deliveries {totals['expected']}, received "
        f"{totals['received']}, missing {totals['missing']}, duplicates "
        f"{totals['duplicates']}, reordered {totals['reordered']}\n"
        f"survivor /readyz: {probe.survivor_samples} probes, worst {worst * 1000:.0f} ms "
        f"({worst_server}, {worst_status}); fewest healthy servers in HAProxy "
        f"{probe.fewest_healthy} over {probe.healthy_samples} samples"
    )
    for roll in rolls:
        print(
            f"  {roll['server']}: {roll['clients']} clients; out of HAProxy "
            f"{roll['out_after']:.2f} s after SIGTERM ({roll['out_reason']}), exited after "
            f"{roll['exited_after']:.2f} s, clients all back after {roll['clients_back_after']:.2f}"
            f" s, back in HAProxy {roll['back_after']:.2f} s after its start"
        )
    for line in (t.line for t in transitions):
        print(f"  haproxy: {line}")
    for bad in verdict["bad"]:
        print(f"  wrong: {json.dumps(bad)}")

    assert verdict["settled"], verdict
    assert totals["connected"] == CLIENTS, verdict
    assert totals["missing"] == 0 and totals["duplicates"] == 0, verdict
    assert totals["reordered"] == 0, verdict
    assert totals["received"] == totals["expected"] > 0, verdict
    # Every instance was restarted, so every client moved at least once, and recovered each time.
    assert totals["moved"] == CLIENTS, verdict
    assert totals["movedNotRecovered"] == 0 and totals["idChanged"] == 0, verdict
    downs = [t for t in transitions if t.state == "DOWN"]
    assert [(t.server, t.reason, t.code) for t in downs] == [
        (name, "Layer7 wrong status", 503) for name in servers
    ], transitions
    assert all(t.active_left >= 1 for t in transitions), transitions
    assert "has no server available" not in proxy.log(), proxy.log()
    assert probe.fewest_healthy >= 1, probe
    assert probe.survivor_samples > 0 and not probe.survivor_failures, probe.survivor_failures
    assert worst < 0.5, f"a survivor's /readyz took {worst * 1000:.0f} ms"


def _roll(
    name: str, server: RoomcastServer, proxy: HAProxy, probe: Probe, crowd: NodeClients
) -> dict[str, Any]:
    """SIGTERM ``server``, wait for its exit and every client to be connected elsewhere, start
    it again and wait until HAProxy sends clients to it; return what happened when."""
    status, body = http_json("GET", f"{server.url}/readyz")
    assert status == 200, body
    clients = body["connections"]
    probe.rolling = name
    process = server.process
    assert process is not None
    sigterm = time.monotonic()
    server.stop(signal.SIGTERM, timeout=STOP_TIMEOUT)
    exited = time.monotonic()
    assert process.returncode == 0, server.stderr()
    wait_until(
        lambda: crowd.call("status")["connected"] == CLIENTS,
        timeout=30,
        what=f"every client to be connected again after {name} stopped",
    )
    back = time.monotonic()
    server.restart(signal.SIGTERM)  # not running any more: starts it on the same port
    started = time.monotonic()
    proxy.wait_status(name, "UP", timeout=15)
    up = time.monotonic()
    probe.rolling = None
    out = [t for t in proxy.transitions() if t.server == name and t.state == "DOWN"]
    return {
        "server": name,
        "clients": clients,
        "out_after": (out[-1].at - sigterm) if out else float("nan"),
        "out_reason": f"{out[-1].reason} {out[-1].code}" if out else "never",
        "exited_after": exited - sigterm,
        "clients_back_after": back - sigterm,
        "back_after": up - started,
    }
