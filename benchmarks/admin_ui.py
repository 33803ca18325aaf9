"""The Socket.IO Admin UI at N connected sockets: the longest event-loop pause the admin
namespace causes, and how long the UI's own sockets page takes in chromium.

A Roomcast node runs in this process (uvloop, pinned to CPU 0 when ``taskset`` exists) with
the admin namespace enabled; ``benchmarks/node/hold.mjs`` holds N clients (each joined to one
of ``--rooms`` rooms), the UI's own files (``@socket.io/admin-ui``'s ``ui/dist``, installed in
``tests/browser``) are served by ``python -m http.server``, and ``tests/browser/admin_ui.mjs``
drives Debian's chromium through playwright-core (the three on CPU 1).

A sampler in the node's loop wakes every millisecond and records how late it woke: the loop
pause.  Phases:

* ``idle``: N sockets, no Admin UI;
* ``churn``: ``--churn`` reconnects and ``--events`` client events per second, no Admin UI;
* ``ui``: chromium logs in, opens the sockets page, reloads it (a second fresh list), turns
  a page, takes the screenshot;
* ``ui+churn``: the same churn while the UI sits on the sockets page (``--hold`` seconds).

    .venv/bin/python benchmarks/admin_ui.py --clients 10000 --screenshot /tmp/admin-ui.png

Prints the pauses per phase (max and p99), the UI's timings, and what the node did for the UI
(lists sent, their size).  Figures, not pass/fail: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import secrets
import shutil
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import orjson
import uvloop

from roomcast import config
from roomcast.admin.serialize import serialize
from roomcast.admin.tap import CHUNK
from roomcast.auth import Authenticator, AuthSettings
from roomcast.node import Node
from roomcast.runner import _tune_gc

ROOT = Path(__file__).resolve().parents[1]
HOLD = ROOT / "benchmarks" / "node" / "hold.mjs"
BROWSER = ROOT / "tests" / "browser"
DRIVER = BROWSER / "admin_ui.mjs"
UI_DIST = BROWSER / "node_modules" / "@socket.io" / "admin-ui" / "ui" / "dist"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def on_cpu(cpu: int, command: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu), *command] if taskset and (os.cpu_count() or 1) > 1 else command


class LagSampler:
    """Wakes every ``period`` seconds; records how late each wake-up was, per phase, and how
    long the cyclic garbage collector ran (a full collection at 10,000 connections is the
    usual suspect of a long pause, whoever allocated last)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.phase = "start"
        self.samples: dict[str, list[float]] = {}
        self.worst: dict[str, list[tuple[float, float]]] = {}
        """Per phase, the longest pauses: (how long, when it ended, perf_counter)."""
        self.collections: dict[str, list[tuple[int, float]]] = {}
        self.beat = time.perf_counter()
        self._gc_began = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, stage: str, info: dict[str, int]) -> None:
        if stage == "start":
            self._gc_began = time.perf_counter()
        else:
            spent = time.perf_counter() - self._gc_began
            self.collections.setdefault(self.phase, []).append((info["generation"], spent))

    def close(self) -> None:
        gc.callbacks.remove(self._gc)

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.period)
            self.beat = time.perf_counter()
            late = self.beat - before - self.period
            self.samples.setdefault(self.phase, []).append(max(late, 0.0))
            if late > 0.010:
                self.worst.setdefault(self.phase, []).append((late, self.beat))

    def summary(self, phase: str) -> dict[str, float]:
        values = sorted(self.samples.get(phase, [0.0]))
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        full = [spent for generation, spent in self.collections.get(phase, []) if generation == 2]
        return {
            "max_ms": values[-1] * 1000,
            "p99_ms": p99 * 1000,
            "samples": len(values),
            "full_gcs": len(full),
            "longest_full_gc_ms": max(full, default=0.0) * 1000,
            "over_10ms": len(self.worst.get(phase, [])),
        }


class StallDumper:
    """Diagnosis: a thread that prints the loop thread's stack whenever the loop has not
    come round for ``ms`` milliseconds (the sampler's beat stands still)."""

    def __init__(self, sampler: LagSampler, ms: float) -> None:
        self._sampler = sampler
        self._limit = ms / 1000
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-dumper", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        dumped_at = -1.0
        while not self._stop.wait(self._limit / 4):
            beat = self._sampler.beat
            if time.perf_counter() - beat > self._limit and beat != dumped_at:
                dumped_at = beat
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame)[-12:]) if frame else "?"
                print(f"--- loop stalled in phase {self._sampler.phase}:\n{stack}", file=sys.stderr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Lines:
    """A subprocess's stdout as JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    async def next(self, seconds: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(seconds):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise RuntimeError(f"{self.name} ended (exit {await self.process.wait()})")
                try:
                    value = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    return value

    async def until(self, key: str, value: Any = None, seconds: float = 300.0) -> dict[str, Any]:
        while True:
            line = await self.next(seconds)
            if "ok" in line and line["ok"] is not True:
                raise RuntimeError(f"{self.name} failed: {json.dumps(line)[:3000]}")
            if key in line and (value is None or line[key] == value):
                return line

    async def send(self, value: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(value) + "\n").encode())
        await self.process.stdin.drain()


@contextlib.asynccontextmanager
async def started(name: str, *command: str, cwd: Path, stdin: bool = False) -> AsyncIterator[Lines]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
    )
    try:
        yield Lines(process, name)
    finally:
        if process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.terminate()
                await process.wait()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    password = secrets.token_urlsafe(12)
    jwt_secret = secrets.token_urlsafe(48)
    ui_port, port = free_port(), free_port()
    ui_origin = f"http://127.0.0.1:{ui_port}"
    settings = config.load(
        {
            "port": port,
            "jwt_secret": jwt_secret,
            "api_key": secrets.token_urlsafe(24),
            "allowed_origins": ui_origin,
            "admin_username": "admin",
            "admin_password_hash": bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode(),
            "admin_socket_list_limit": args.list_limit,
            "max_connections": args.clients * 2 + 100,
        },
        {},
    )
    token = Authenticator(AuthSettings(secret=jwt_secret)).mint(
        "bench", ["bench:**"], [], ttl_seconds=24 * 3600
    )
    node = Node(settings)
    assert node.admin is not None
    syncs: list[dict[str, float]] = []
    console = node.admin.console
    original_sync, original_send_list = console._sync, console._send_list

    async def timed_sync() -> None:
        began = time.perf_counter()
        await original_sync()
        syncs[-1]["ms"] = (time.perf_counter() - began) * 1000
        syncs[-1]["began"] = began
        syncs[-1]["ended"] = time.perf_counter()

    def sized_send_list(items: list[str]) -> None:
        began = time.perf_counter()
        original_send_list(items)
        syncs.append(
            {
                "sockets": sum(item.count('"clientId"') for item in items),
                "bytes": sum(len(item) for item in items),
                "send_ms": (time.perf_counter() - began) * 1000,
            }
        )

    console._sync = timed_sync  # type: ignore[method-assign]
    console._send_list = sized_send_list  # type: ignore[method-assign]
    spans = trace_spans(node)
    _tune_gc()  # as roomcast serve does
    await node.start()
    sampler = LagSampler()
    sampler_task = asyncio.create_task(sampler.run(), name="lag-sampler")
    dumper = StallDumper(sampler, args.stall_dump_ms) if args.stall_dump_ms else None
    url = f"http://127.0.0.1:{port}"
    phases: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {}
    try:
        async with (
            started(
                "http.server",
                *on_cpu(1, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]),
                str(ui_port),
                cwd=UI_DIST,
            ),
            started(
                "hold.mjs",
                *on_cpu(1, ["node", str(HOLD)]),
                *("--url", url, "--token", token, "--clients", str(args.clients)),
                *("--rooms", str(args.rooms)),
                cwd=HOLD.parent,
                stdin=True,
            ) as hold,
        ):
            sampler.phase = "connecting"
            ready = await hold.until("ready", seconds=600)
            result["connected"] = ready
            for phase, rates in (
                ("idle", {}),
                ("churn", {"churn": args.churn, "events": args.events}),
            ):
                await hold.send(rates)
                await hold.until("rates")
                sampler.phase = phase
                await asyncio.sleep(args.phase_seconds)
                phases[phase] = sampler.summary(phase)
            await hold.send({})
            await hold.until("rates")
            sampler.phase = "settle"
            await asyncio.sleep(1)
            listed = min(args.list_limit, ready["ready"])
            driver_config = {
                "mode": "measure",
                "uiUrl": f"{ui_origin}/",
                "serverUrl": url,
                "username": "admin",
                "password": password,
                "chromium": shutil.which("chromium") or "/usr/bin/chromium",
                "userDataDir": str(Path(args.workdir) / f"profile-{os.getpid()}"),
                "timeoutMs": 600_000,
                "expectSockets": listed,
                "holdMs": int(args.hold * 1000),
                "screenshot": args.screenshot,
                "dashboardScreenshot": args.dashboard_screenshot,
                "serversScreenshot": args.servers_screenshot,
                "viewport": {"width": 1400, "height": 1250},  # a page of 20 sockets, whole
            }
            sampler.phase = "launch"  # forking this big process pauses it: not the admin's
            async with started(
                "admin_ui.mjs",
                *on_cpu(1, ["node", str(DRIVER), json.dumps(driver_config)]),
                cwd=BROWSER,
                stdin=True,
            ) as driver:
                sampler.phase = "ui"
                await driver.until("step", "holding", seconds=900)
                phases["ui"] = sampler.summary("ui")
                await hold.send({"churn": args.churn, "events": args.events})
                await hold.until("rates")
                sampler.phase = "ui+churn"
                browser = await driver.until("ok", seconds=900)
                phases["ui+churn"] = sampler.summary("ui+churn")
                await hold.send({})
                result["browser"] = browser["result"]
            sampler.phase = "slices"
            result["slices"] = slices(node)
            sampler.phase = "done"
    finally:
        sampler_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler_task
        sampler.close()
        if dumper is not None:
            dumper.close()
        await node.stop()
    result["phases"] = phases
    longest: dict[str, tuple[float, float]] = {}
    for name, began, ended, cpu in spans:
        wall, most_cpu = longest.get(name, (0.0, 0.0))
        longest[name] = (max(wall, (ended - began) * 1000), max(most_cpu, cpu * 1000))
    result["longest_pieces_ms"] = {
        name: {"wall": round(wall, 2), "cpu": round(cpu, 2)}
        for name, (wall, cpu) in sorted(longest.items())
    }
    result["pauses_in_syncs"] = {
        phase: [
            (round(late * 1000, 1), sorted(overlapping(spans, at - late, at)))
            for late, at in sorted(worst, reverse=True)[:5]
        ]
        for phase, worst in sampler.worst.items()
        if phase in phases
    }
    result["syncs"] = syncs
    result["resyncs"] = {
        sample.labels["cause"]: sample.value
        for family in node.metrics.admin_resyncs.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    return result


Span = tuple[str, float, float, float]
"""(what, began, ended, CPU seconds of this thread meanwhile)."""


def trace_spans(node: Node) -> list[Span]:
    """Wrap the admin's pieces of work (and the garbage collector) to record when each ran:
    a long pause is then put down to what overlapped it."""
    admin = node.admin
    assert admin is not None
    spans: list[Span] = []

    def sync_wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            began, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spans.append((name, began, time.perf_counter(), time.thread_time() - cpu))

        setattr(owner, name, wrapped)

    for owner, name in (
        (admin.stats, "snapshot"),
        (admin.tap, "capture"),
        (admin.tap, "chunk"),
        (admin.console, "on_chunk"),
        (admin.console, "on_feed"),
        (admin.console, "_send_list"),
        (admin.console, "_send"),
        (node.cluster, "on_message"),
    ):
        sync_wrap(owner, name)
    gc_began = [0.0, 0.0]

    def on_gc(stage: str, info: dict[str, int]) -> None:
        if stage == "start":
            gc_began[:] = [time.perf_counter(), time.thread_time()]
        else:
            spans.append(
                (
                    f"gc{info['generation']}",
                    gc_began[0],
                    time.perf_counter(),
                    time.thread_time() - gc_began[1],
                )
            )

    gc.callbacks.append(on_gc)
    return spans


def overlapping(spans: list[Span], start: float, end: float) -> set[str]:
    """What ran within ``[start, end]``, with the milliseconds it took there."""
    found: dict[str, float] = {}
    for name, began, ended, _cpu in spans:
        if began <= end and ended >= start:
            found[name] = found.get(name, 0.0) + (min(ended, end) - max(began, start)) * 1000
    return {f"{name} {ms:.1f}" for name, ms in found.items() if ms >= 0.5}


def slices(node: Node) -> dict[str, float]:
    """The admin's pieces of synchronous work, each timed alone: what one Admin UI's stats
    round costs every instance, what one chunk of a socket list costs, and what recording one
    connect costs while an Admin UI watches."""
    admin = node.admin
    assert admin is not None
    sockets = [s for s in node.sockets.sockets.values() if not s.namespace.internal]
    instance = node.cluster.instance

    def slowest(work: Any) -> float:
        """The median CPU time of 21 runs (wall time on this shared machine is noisier)."""
        times = []
        for _ in range(21):
            began = time.thread_time()
            work()
            times.append(time.thread_time() - began)
        return statistics.median(times) * 1000

    def chunk() -> None:
        part = [serialize(s, instance, sorted(s.rooms)) for s in sockets[:CHUNK]]
        orjson.dumps({"t": "admin.chunk", "data": orjson.dumps(part).decode()[1:-1]})

    return {
        "capture_ms": slowest(lambda: admin.tap.capture(node.settings.admin_socket_list_limit)),
        "stats_round_ms": slowest(lambda: orjson.dumps(admin.stats.snapshot("bench"))),
        "list_chunk_ms": slowest(chunk),
        "record_connect_us": slowest(lambda: serialize(sockets[0], instance)) * 1000,
        "young_gc_ms": slowest(lambda: gc.collect(0)),
        "sockets": len(sockets),
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    print(f"\n## Admin UI at {args.clients:,} sockets ({args.rooms:,} rooms)\n")
    print(f"connected: {result['connected']}")
    print(
        "\n| phase | longest loop pause | p99 pause | samples | pauses > 10 ms | full GCs (longest) |"
        "\n|---|---:|---:|---:|---:|---:|"
    )
    for phase, summary in result["phases"].items():
        print(
            f"| {phase} | {summary['max_ms']:.1f} ms | {summary['p99_ms']:.2f} ms "
            f"| {summary['samples']:,} | {summary['over_10ms']} "
            f"| {summary['full_gcs']} ({summary['longest_full_gc_ms']:.0f} ms) |"
        )
    print(
        "\nthe longest piece of each kind of work during the run, wall and CPU time (ms;"
        " on_message: every control message, decoding included; gcN: the collector):",
        json.dumps(result["longest_pieces_ms"]),
    )
    print(
        "\nthe longest pauses per phase (ms), and what ran meanwhile (ms of it):",
        json.dumps(result["pauses_in_syncs"]),
    )
    browser = result["browser"]
    held = browser["held_long_tasks_ms"]
    print("\n| chromium | figure |\n|---|---:|")
    print(
        f"| sockets page: click to a table of {min(args.list_limit, args.clients):,} | "
        f"{browser['sockets_page_ms']:,} ms |"
    )
    print(
        f"| reload to the same table (login by session id, fresh list) | "
        f"{browser['reload_to_list_ms']:,} ms |"
    )
    print(f"| next page of the table | {browser['next_page_ms']:,} ms |")
    print(
        f"| long tasks (>50 ms) during {args.hold:.0f} s of churn on the sockets page | "
        f"{len(held)}, longest {max(held, default=0)} ms, total {sum(held)} ms |"
    )
    print(f"| footer after the churn | {browser['held_footer']} |")
    print(
        "\n| socket lists sent | sockets | JSON bytes | sync total | encode+write |\n|---|---:|---:|---:|---:|"
    )
    for index, sync in enumerate(result["syncs"]):
        print(
            f"| {index + 1} | {sync['sockets']:,} | {sync['bytes']:,} | {sync.get('ms', 0):.1f} ms "
            f"| {sync['send_ms']:.1f} ms |"
        )
    print(f"\nresyncs by cause: {result['resyncs']}")
    cut = result["slices"]
    print(
        f"\nadmin work, each piece alone (median CPU time of 21) at {cut['sockets']:,} sockets: "
        f"a stats round {cut['stats_round_ms']:.2f} ms; choosing a list's sockets "
        f"{cut['capture_ms']:.2f} ms; a list chunk of {CHUNK} sockets "
        f"{cut['list_chunk_ms']:.2f} ms; recording one connect {cut['record_connect_us']:.0f} µs"
        f" (for scale: a young-generation collection {cut['young_gc_ms']:.2f} ms)"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


async def _debugged(args: argparse.Namespace) -> dict[str, Any]:
    asyncio.get_running_loop().slow_callback_duration = args.slow_callbacks_ms / 1000
    return await measure(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=1_000)
    parser.add_argument("--churn", type=float, default=20.0, help="reconnects per second")
    parser.add_argument("--events", type=float, default=50.0, help="client events per second")
    parser.add_argument("--phase-seconds", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds of churn with the UI")
    parser.add_argument("--list-limit", type=int, default=2000, help="admin_socket_list_limit")
    parser.add_argument("--screenshot", default=None, help="PNG of the sockets page")
    parser.add_argument("--dashboard-screenshot", default=None)
    parser.add_argument("--servers-screenshot", default=None)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--json-out", default=None)
    parser.add_argument(
        "--stall-dump-ms",
        type=float,
        default=0.0,
        help="diagnosis: print the loop's stack whenever it stalls this long",
    )
    parser.add_argument(
        "--slow-callbacks-ms",
        type=float,
        default=0.0,
        help="diagnosis: run on asyncio's debug loop (not uvloop), which logs every callback "
        "that holds the loop longer than this",
    )
    args = parser.parse_args()
    if not (UI_DIST / "index.html").is_file():
        sys.exit(f"{UI_DIST} is missing: run npm ci in {BROWSER}")
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # the children go to CPU 1 with taskset
    if args.slow_callbacks_ms:  # find what holds the loop: asyncio's debug mode names it
        logging.basicConfig(level=logging.WARNING)
        result = asyncio.run(_debugged(args), debug=True)
    else:
        result = uvloop.run(measure(args))
    report(args, result)


if __name__ == "__main__":
    main()
