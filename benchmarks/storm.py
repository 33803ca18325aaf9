"""How promptly an instance answers its health checks while it takes a reconnection storm.

Two instances on one Redis behind Debian's HAProxy (the configuration of
``tests/haproxy_fixtures.py``). Every client connects while only A runs (official
socket.io-client sockets from ``tests/interop/roll_clients.mjs``, a tenth polling-only, in
rooms, with publications flowing); then B starts, HAProxy takes it in, and A gets SIGTERM:
all its clients come to B, at once (``--window 0``) or spread over the drain window. Meanwhile
B's ``/readyz`` and ``/healthz`` are polled directly, each on a new connection, and the
answer times are printed.

    .venv/bin/python benchmarks/storm.py --clients 2000 --window 0
    .venv/bin/python benchmarks/storm.py --clients 2000 --window 5

Needs redis-server, haproxy and node on PATH and ``npm ci`` in tests/interop.
"""

from __future__ import annotations

import argparse
import http.client
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import INTEROP_DIR, Credentials, RoomcastServer  # noqa: E402
from haproxy_fixtures import HAProxy  # noqa: E402
from multi_fixtures import NodeClients  # noqa: E402

from redis_fixtures import RedisServer, wait_until  # noqa: E402
from roomcast.auth import Authenticator, AuthSettings  # noqa: E402


class Poller:
    """Polls ``url`` every ``every`` seconds on a new connection; keeps the answer times."""

    def __init__(self, url: str, every: float) -> None:
        self.url = url
        self.every = every
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "", parts.port or 80, parts.path
        self.times: list[float] = []
        """Seconds from connecting to the end of the answer, each probe."""
        self.connects: list[float] = []
        """Seconds the TCP connection took, each probe."""
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poll {url}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            started = time.perf_counter()
            connection = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                connection.connect()
                connected = time.perf_counter()
                connection.request("GET", self.path)
                connection.getresponse().read()
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            finally:
                connection.close()
            self.times.append(time.perf_counter() - started)
            self.connects.append(connected - started)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> str:
        if not self.times:
            return f"no answers ({len(self.failures)} failures)"
        ordered = sorted(self.times)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"{len(ordered)} answers, median {statistics.median(ordered) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, worst {ordered[-1] * 1000:.1f} ms, "
            f"{len(self.failures)} failures (TCP connect: worst "
            f"{max(self.connects) * 1000:.1f} ms)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--polling-every", type=int, default=10)
    parser.add_argument("--rate", type=float, default=4.0, help="publications per room per second")
    parser.add_argument("--delay", type=float, default=2.0, help="A's --drain-delay-s")
    parser.add_argument("--window", type=float, default=0.0, help="A's --drain-window-s")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between probes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    node = shutil.which("node")
    if node is None or not (INTEROP_DIR / "node_modules" / "socket.io-client").is_dir():
        sys.exit("needs node and `npm ci` in tests/interop")
    work = Path(tempfile.mkdtemp(prefix="roomcast-storm-"))
    credentials = Credentials(secrets.token_urlsafe(48), secrets.token_urlsafe(24))
    redis = RedisServer(work / "redis")
    redis.start()
    common = ("--redis-url", redis.url, "--redis-prefix", "storm", "--trusted-proxies", "127.0.0.1")
    drain = ("--drain-delay-s", str(args.delay), "--drain-window-s", str(args.window))
    a = RoomcastServer(work / "a", credentials, *common, *drain, "--drain-seconds", "10")
    b = RoomcastServer(work / "b", credentials, *common)
    proxy: HAProxy | None = None
    crowd: NodeClients | None = None
    pollers: list[Poller] = []
    try:
        a.start()
        proxy = HAProxy(work, {"a": a.port, "b": b.port})
        proxy.wait_status("a", "UP", timeout=10)
        crowd = NodeClients(node, INTEROP_DIR / "roll_clients.mjs")
        auth = Authenticator(AuthSettings(secret=credentials.jwt_secret))
        token = auth.mint("storm", ["roll:*"], [], ttl_seconds=3600)
        opened: dict[str, Any] = crowd.call(
            "open",
            url=proxy.url,
            token=token,
            clients=args.clients,
            rooms=args.rooms,
            pollingEvery=args.polling_every,
            timeoutMs=120_000,
            timeout=180,
        )
        print(f"{opened['connected']} clients on A in {opened['ms'] / 1000:.1f} s", flush=True)
        crowd.call("publish", url=proxy.url, apiKey=credentials.api_key, perRoomPerSecond=args.rate)
        b.start()
        proxy.wait_status("b", "UP", timeout=10)
        pollers = [Poller(f"{b.url}/readyz", args.every), Poller(f"{b.url}/healthz", args.every)]
        time.sleep(1)  # a second of B's quiet answer times, for comparison
        assert a.process is not None
        a.process.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        a.process.wait(timeout=60)
        exited = time.monotonic() - sigterm
        wait_until(
            lambda: crowd is not None and crowd.call("status")["connected"] == args.clients,
            timeout=60,
            what="every client on B",
        )
        moved = time.monotonic() - sigterm
        time.sleep(1)
        for poller in pollers:
            poller.stop()
        crowd.call("stopPublishing", timeout=30)
        verdict = crowd.call("settle", timeoutMs=30_000, timeout=45)
        totals = verdict["totals"]
        print(
            f"A: drain delay {args.delay} s, window {args.window} s; exited {exited:.1f} s after "
            f"SIGTERM; every client connected to B {moved:.1f} s after SIGTERM"
        )
        print(
            f"moved {totals['moved']} of {totals['clients']} clients, not recovered "
            f"{totals['movedNotRecovered']}, connect errors {totals['connectErrors']}; "
            f"events missing {totals['missing']}, duplicated {totals['duplicates']}, "
            f"reordered {totals['reordered']} of {totals['expected']}"
        )
        for poller in pollers:
            print(f"B {poller.url.rsplit('/', 1)[1]}: {poller.summary()}")
        with urllib.request.urlopen(f"{b.url}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        for line in metrics.splitlines():
            if line.startswith(("roomcast_recoveries_total", "roomcast_dropped")):
                print(f"B {line}")
    finally:
        for poller in pollers:
            poller.stop()
        if crowd is not None:
            crowd.close()
        if proxy is not None:
            proxy.close()
        for server in (a, b):
            server.kill()
        redis.stop()
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
