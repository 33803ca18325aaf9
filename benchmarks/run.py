#!/usr/bin/env python3
"""Roomcast benchmark harness driver (stdlib only).

For every selected scenario and server it starts the server (pinned to one CPU),
waits for ``GET /healthz``, runs the Node load generator (``node/loadgen.mjs``,
pinned to another CPU), samples the server's ``/proc`` counters at the phase
boundaries the load generator announces, stops the server, and finally prints a
markdown table per scenario and writes all results as JSON to
``benchmarks/results/<timestamp>.json``.

    python benchmarks/run.py                      # all scenarios, all servers
    python benchmarks/run.py --smoke              # CI-sized run, well under a minute
    python benchmarks/run.py --scenario saturated --clients 1000 --servers node

See benchmarks/README.md for what every metric means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
NODE_DIR = BENCH_DIR / "node"
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"
ROOM_PREFIX = "bench:room-"
TOKEN_ROOMS = "bench:*"
ALL_SERVERS = ("roomcast", "node", "roomcast-redis", "roomcast-w2")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A server or the load generator failed; the message says how."""


# ---------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    clients: int
    rooms: int
    mode: str  # "closed": closed-loop publisher; "rate": open loop, `rate` ev/s per room
    rate: float
    duration: float
    inflight: int


SCENARIOS: dict[str, Scenario] = {
    "saturated": Scenario(
        name="saturated",
        description="one room, closed-loop publisher keeping ~INFLIGHT events in flight",
        clients=1000,
        rooms=1,
        mode="closed",
        rate=0.0,
        duration=10.0,
        inflight=8,
    ),
    "collab": Scenario(
        name="collab",
        description="many rooms of 10, each room receiving RATE events/s",
        clients=10_000,
        rooms=1000,
        mode="rate",
        rate=2.0,
        duration=20.0,
        inflight=8,
    ),
    "bigroom": Scenario(
        name="bigroom",
        description="one big room receiving RATE events/s",
        clients=10_000,
        rooms=1,
        mode="rate",
        rate=1.0,
        duration=20.0,
        inflight=8,
    ),
}

SMOKE_CLIENTS = 50
SMOKE_ROOMS = 5
SMOKE_DURATION = 2.0


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out: list[Scenario] = []
    for name in names:
        sc = SCENARIOS[name]
        if args.smoke:
            sc = replace(
                sc,
                clients=SMOKE_CLIENTS,
                rooms=SMOKE_ROOMS if sc.rooms > 1 else 1,
                duration=SMOKE_DURATION,
            )
        if args.clients is not None:
            sc = replace(sc, clients=args.clients)
        if args.rooms is not None:
            sc = replace(sc, rooms=args.rooms)
        if args.rate is not None:
            sc = replace(sc, rate=args.rate)
        if args.duration is not None:
            sc = replace(sc, duration=args.duration)
        if args.inflight is not None:
            sc = replace(sc, inflight=args.inflight)
        if sc.clients < 1 or sc.rooms < 1 or sc.duration <= 0:
            raise SystemExit(f"{name}: clients, rooms and duration must be positive")
        out.append(sc)
    return out


# ---------------------------------------------------------------------------
# /proc sampling (Linux)


@dataclass(frozen=True)
class ProcSample:
    pids: tuple[int, ...]
    cpu_seconds: float  # utime + stime (+ cutime + cstime of reaped children)
    rss_kib: int  # sum of VmRSS over the process tree


def _read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "pid (comm)"; comm may contain spaces and parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The root pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _read_stat(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree = [root]
    i = 0
    while i < len(tree):
        tree.extend(children.get(tree[i], []))
        i += 1
    return tree


def sample_tree(root: int) -> ProcSample:
    pids = process_tree(root)
    ticks = 0
    rss = 0
    alive: list[int] = []
    for pid in pids:
        fields = _read_stat(pid)
        if fields is None:
            continue
        # stat fields 14..17 (1-based): utime stime cutime cstime -> index 11..14 here.
        ticks += sum(int(x) for x in fields[11:15])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        alive.append(pid)
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
                break
    return ProcSample(pids=tuple(alive), cpu_seconds=ticks / CLK_TCK, rss_kib=rss)


# ---------------------------------------------------------------------------
# Helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def find_roomcast() -> list[str] | None:
    """Command prefix that runs the roomcast CLI, or None when not installed."""
    candidates = [
        Path(sys.executable).parent / "roomcast",
        REPO_ROOT / ".venv" / "bin" / "roomcast",
    ]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return [str(cand)]
    found = shutil.which("roomcast")
    if found:
        return [found]
    probe = subprocess.run(
        [sys.executable, "-c", "import roomcast.cli"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "roomcast"]
    return None


def ensure_node_deps() -> None:
    if (NODE_DIR / "node_modules" / "jsonwebtoken").is_dir() and (
        NODE_DIR / "node_modules" / "socket.io"
    ).is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm not found: install Node.js >= 18 with npm")
    sub = "ci" if (NODE_DIR / "package-lock.json").is_file() else "install"
    log(f"installing Node dependencies: npm {sub} (in {NODE_DIR})")
    subprocess.run(
        [npm, sub, "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True
    )


def node_version(node: str) -> str:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


@dataclass
class Pinning:
    enabled: bool
    server_cpus: str
    loadgen_cpus: str
    note: str

    def prefix(self, cpus: str) -> list[str]:
        return ["taskset", "-c", cpus] if self.enabled else []


def decide_pinning(args: argparse.Namespace) -> Pinning:
    if args.no_pin:
        return Pinning(False, "", "", "CPU pinning disabled (--no-pin)")
    if shutil.which("taskset") is None:
        return Pinning(False, "", "", "taskset not found: processes not pinned")
    available = sorted(os.sched_getaffinity(0))
    wanted = _parse_cpus(args.server_cpus) | _parse_cpus(args.loadgen_cpus)
    if not wanted <= set(available):
        return Pinning(
            False, "", "", f"CPUs {sorted(wanted)} not all available ({available}): not pinned"
        )
    return Pinning(
        True,
        args.server_cpus,
        args.loadgen_cpus,
        f"server pinned to CPU {args.server_cpus}, load generator to CPU {args.loadgen_cpus}",
    )


def _parse_cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return cpus


# ---------------------------------------------------------------------------
# Servers


@dataclass
class ServerSpec:
    name: str
    description: str
    kind: str  # "roomcast" | "node"
    workers: int = 1
    redis: bool = False  # needs a shared Redis broker (started by the harness)


SERVER_SPECS: dict[str, ServerSpec] = {
    "roomcast": ServerSpec("roomcast", "roomcast serve (1 process), JWT required", "roomcast"),
    "node": ServerSpec(
        "node",
        "reference Node socket.io 4.8 server (websocket only, perMessageDeflate off, "
        "JWT verified with jsonwebtoken)",
        "node",
    ),
    "roomcast-w2": ServerSpec(
        "roomcast-w2",
        "roomcast serve --workers 2 --redis-url (workers need a shared broker), JWT required; "
        "CPU/RSS summed over the parent, its workers and the private redis-server",
        "roomcast",
        workers=2,
        redis=True,
    ),
    # Not run by default: isolates the cost of the Redis broker from the cost of workers.
    "roomcast-redis": ServerSpec(
        "roomcast-redis",
        "roomcast serve (1 process) --redis-url, JWT required; "
        "CPU/RSS summed over roomcast and the private redis-server",
        "roomcast",
        redis=True,
    ),
}


@dataclass
class Context:
    args: argparse.Namespace
    node: str
    pinning: Pinning
    stamp: str
    log_dir: Path
    api_key: str
    jwt_secret: str
    roomcast: list[str] | None = None
    roomcast_token: str | None = None
    roomcast_token_error: str | None = None
    roomcast_serve_flags: set[str] = field(default_factory=set)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we started (SIGKILL after `grace` seconds)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    # Workers that outlived their parent are still in the process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class RunningServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        # Helper processes that belong to this server's deployment (redis-server).
        self.aux: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def roots(self) -> dict[str, int]:
        """Process-tree roots whose CPU and memory are charged to this server."""
        return {"server": self.proc.pid, **{k: p.pid for k, p in self.aux.items()}}

    def stop(self) -> None:
        stop_group(self.proc)
        for aux in self.aux.values():
            stop_group(aux)


def server_command(
    ctx: Context, spec: ServerSpec, port: int, clients: int, redis_url: str | None
) -> list[str]:
    if spec.kind == "node":
        return [
            ctx.node,
            str(NODE_DIR / "reference-server.mjs"),
            "--host",
            HOST,
            "--port",
            str(port),
            "--api-key",
            ctx.api_key,
            "--jwt-secret",
            ctx.jwt_secret,
        ]
    if ctx.roomcast is None:
        raise BenchError("roomcast CLI not found (is the package installed in the venv?)")
    cmd = [
        *ctx.roomcast,
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--jwt-secret",
        ctx.jwt_secret,
        "--api-key",
        ctx.api_key,
    ]
    if "--drain-delay-s" in ctx.roomcast_serve_flags:  # stopped when measured: no drain
        cmd += ["--drain-delay-s", "0", "--drain-window-s", "0"]
    if "--max-connections" in ctx.roomcast_serve_flags:
        cmd += ["--max-connections", str(max(2 * clients, 100_000))]
    if redis_url is not None:
        cmd += ["--redis-url", redis_url]
    if spec.workers > 1:
        cmd += ["--workers", str(spec.workers)]
    return cmd


def start_redis(ctx: Context, name: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private, non-persistent redis-server on a free port (pinned like the server)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server not found (needed by Roomcast with --workers > 1)")
    port = free_port()
    data_dir = ctx.log_dir / f"{name}-redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        *ctx.pinning.prefix(ctx.pinning.server_cpus),
        exe,
        "--bind",
        HOST,
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
    ]
    log_path = ctx.log_dir / f"{name}-redis.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + ctx.args.ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited early; log tail:\n{tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(64).startswith(b"+PONG"):
                return proc, f"redis://{HOST}:{port}/0"
        time.sleep(0.05)
    stop_group(proc)
    raise BenchError(f"redis-server not ready; log tail:\n{tail(log_path)}")


def count_listeners(port: int) -> int:
    """Listening TCP sockets on `port` (one per SO_REUSEPORT worker)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                count += 1
    return count


def start_server(ctx: Context, spec: ServerSpec, scenario: Scenario) -> RunningServer:
    base = f"{scenario.name}-{spec.name}"
    redis: subprocess.Popen[bytes] | None = None
    redis_url: str | None = None
    if spec.redis:
        if ctx.args.redis_url:
            redis_url = ctx.args.redis_url
        else:
            redis, redis_url = start_redis(ctx, base)
    port = free_port()
    try:
        cmd = ctx.pinning.prefix(ctx.pinning.server_cpus) + server_command(
            ctx, spec, port, scenario.clients, redis_url
        )
    except BenchError:
        if redis is not None:
            stop_group(redis)
        raise
    log_path = ctx.log_dir / f"{base}-server.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=NODE_DIR if spec.kind == "node" else REPO_ROOT,
            start_new_session=True,
        )
    server = RunningServer(proc, port, log_path)
    if redis is not None:
        server.aux["redis"] = redis
    try:
        wait_ready(server, ctx.args.ready_timeout, spec.workers)
    except BenchError:
        server.stop()
        raise
    return server


def wait_ready(server: RunningServer, timeout: float, workers: int) -> None:
    """Poll GET /healthz until it answers 200 and, for a multi-worker server, until every
    worker listens on the port (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"server exited with code {server.proc.returncode} before becoming ready; "
                f"log tail:\n{tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as resp:
                last = f"HTTP {resp.status}"
                if resp.status == 200:
                    listeners = count_listeners(server.port)
                    if listeners >= workers:
                        return
                    last = f"{listeners}/{workers} workers listening"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(
        f"server not ready after {timeout:.0f} s ({last}); log tail:\n{tail(server.log_path)}"
    )


def probe_roomcast(ctx: Context) -> None:
    ctx.roomcast = find_roomcast()
    if ctx.roomcast is None:
        ctx.roomcast_token_error = "roomcast CLI not found"
        return
    help_out = subprocess.run(
        [*ctx.roomcast, "serve", "--help"], capture_output=True, text=True, check=False
    )
    text = help_out.stdout + help_out.stderr
    ctx.roomcast_serve_flags = {
        word.rstrip(",=").split("=")[0] for word in text.split() if word.startswith("--")
    }
    minted = subprocess.run(
        [
            *ctx.roomcast,
            "token",
            "--sub",
            "bench",
            "--rooms",
            TOKEN_ROOMS,
            "--jwt-secret",
            ctx.jwt_secret,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    token = minted.stdout.strip()
    if minted.returncode != 0 or not token or len(token.split()) != 1:
        ctx.roomcast_token_error = (
            f"`roomcast token` failed (exit {minted.returncode}): "
            f"{(minted.stderr or minted.stdout).strip()[-500:]}"
        )
    else:
        ctx.roomcast_token = token


# ---------------------------------------------------------------------------
# Load generator


def _reader(stream: IO[bytes], out: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        out.put(raw.decode("utf-8", errors="replace").rstrip("\n"))
    out.put(None)


def loadgen_command(
    ctx: Context, spec: ServerSpec, scenario: Scenario, server: RunningServer
) -> list[str]:
    a = ctx.args
    cmd = [
        *ctx.pinning.prefix(ctx.pinning.loadgen_cpus),
        ctx.node,
        str(NODE_DIR / "loadgen.mjs"),
        "--sync",
        "--url",
        server.url,
        "--api-key",
        ctx.api_key,
        "--clients",
        str(scenario.clients),
        "--rooms",
        str(scenario.rooms),
        "--room-prefix",
        ROOM_PREFIX,
        "--mode",
        scenario.mode,
        "--rate",
        str(scenario.rate),
        "--inflight",
        str(scenario.inflight),
        "--duration",
        str(scenario.duration),
        "--payload-bytes",
        str(a.payload_bytes),
        "--connect-concurrency",
        str(a.connect_concurrency),
        "--http-sockets",
        str(a.http_sockets),
        "--drain-timeout",
        str(a.drain_timeout),
        "--procs",
        str(a.loadgen_procs),
    ]
    if spec.kind == "roomcast":
        if ctx.roomcast_token is None:
            raise BenchError(ctx.roomcast_token_error or "no roomcast token")
        cmd += ["--token", ctx.roomcast_token, "--token-mode", a.token_mode]
        if not a.shared_token:
            cmd += ["--jwt-secret", ctx.jwt_secret]
    else:  # the reference verifies the same distinct tokens
        cmd += ["--jwt-secret", ctx.jwt_secret, "--token-mode", "auth"]
    return cmd


def sample_server(server: RunningServer) -> dict[str, ProcSample]:
    """One sample per root process tree of the server, plus their sum as "total"."""
    parts = {name: sample_tree(pid) for name, pid in server.roots().items()}
    parts["total"] = ProcSample(
        pids=tuple(pid for p in parts.values() for pid in p.pids),
        cpu_seconds=sum(p.cpu_seconds for p in parts.values()),
        rss_kib=sum(p.rss_kib for p in parts.values()),
    )
    return parts


@dataclass
class PhaseSamples:
    pre_connect: dict[str, ProcSample] | None = None
    connected: dict[str, ProcSample] | None = None
    drained: dict[str, ProcSample] | None = None
    handoffs: dict[str, float] | None = None
    """With workers: ``roomcast_handoffs_total`` by result once everyone joined."""


HANDOFF_RESULTS = ("sent", "kept", "failed")


def read_handoffs(url: str) -> dict[str, float]:
    """``roomcast_handoffs_total`` by result, summed over the workers, from ``/metrics``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = dict.fromkeys(HANDOFF_RESULTS, 0.0)
    for line in text.splitlines():
        if line.startswith("roomcast_handoffs_total{"):
            labels, _, value = line.rpartition(" ")
            for result in HANDOFF_RESULTS:
                if f'result="{result}"' in labels:
                    found[result] += float(value)
    return found


def run_loadgen(
    ctx: Context, spec: ServerSpec, scenario: Scenario, server: RunningServer
) -> tuple[dict[str, Any], PhaseSamples]:
    cmd = loadgen_command(ctx, spec, scenario, server)
    err_path = ctx.log_dir / f"{scenario.name}-{spec.name}-loadgen.log"
    samples = PhaseSamples()
    timeout = 120.0 + 3 * scenario.duration + scenario.clients / 100
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=NODE_DIR
        )
        assert proc.stdin is not None and proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        result: dict[str, Any] | None = None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"load generator timed out after {timeout:.0f} s")
                try:
                    line = lines.get(timeout=remaining)
                except queue.Empty:
                    continue
                if line is None:
                    break
                if line.startswith("PHASE "):
                    name = line.split(" ", 1)[1].strip()
                    if server.proc.poll() is not None:
                        proc.stdin.write(b"abort\n")
                        proc.stdin.flush()
                        raise BenchError(
                            f"server died (exit {server.proc.returncode}) before phase {name}; "
                            f"log tail:\n{tail(server.log_path)}"
                        )
                    sample = sample_server(server)
                    if name == "pre-connect":
                        samples.pre_connect = sample
                    elif name == "connected":
                        samples.connected = sample
                        if spec.kind == "roomcast" and spec.workers > 1:
                            samples.handoffs = read_handoffs(server.url)
                    elif name == "drained":
                        samples.drained = sample
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if result is None:
        raise BenchError(
            f"load generator exited with code {proc.returncode} without a result; "
            f"stderr tail:\n{tail(err_path)}"
        )
    if "error" in result:
        raise BenchError(
            f"load generator aborted: {result['error']}\n"
            f"protocol problems: {json.dumps(result.get('protocol', {}), indent=1)}"
        )
    return result, samples


# ---------------------------------------------------------------------------
# Metrics


def compute_metrics(
    scenario: Scenario, raw: dict[str, Any], samples: PhaseSamples, workers: int
) -> dict[str, Any]:
    conn = raw["connect"]
    delivery = raw["delivery"]
    lat = raw["latencyMs"]
    pub = raw["publish"]
    assert samples.pre_connect and samples.connected and samples.drained
    pre, mid, end = (
        samples.pre_connect["total"],
        samples.connected["total"],
        samples.drained["total"],
    )
    cpu = end.cpu_seconds - mid.cpu_seconds
    breakdown = {
        part: {
            "cpu_seconds": samples.drained[part].cpu_seconds - samples.connected[part].cpu_seconds,
            "rss_before_kib": samples.pre_connect[part].rss_kib,
            "rss_connected_kib": samples.connected[part].rss_kib,
            "processes": len(samples.connected[part].pids),
        }
        for part in samples.connected
        if part != "total"
    }
    delivered = int(delivery["delivered"])
    connected = int(conn["connected"])
    rss_delta = mid.rss_kib - pre.rss_kib
    return {
        "clients": scenario.clients,
        "connected": connected,
        "connect_failed": int(conn["failed"]),
        "joined": int(raw["join"]["joined"]),
        "join_failed": int(raw["join"]["failed"]),
        "connect_rate": conn["rate"],
        "join_rate": raw["join"]["rate"],
        "latency_p50_ms": lat["p50"],
        "latency_p95_ms": lat["p95"],
        "latency_p99_ms": lat["p99"],
        "latency_max_ms": lat["max"],
        "latency_mean_ms": lat["mean"],
        "published": int(pub["accepted"]),
        "publish_errors": int(pub["errors"]),
        "publish_rate": pub["rate"],
        "publish_mean_response_ms": pub["meanResponseMs"],
        "expected": int(delivery["expected"]),
        "delivered": delivered,
        "lost": int(delivery["lost"]),
        "duplicates": int(delivery["duplicates"]),
        "misrouted": int(delivery["misrouted"]),
        "disconnects": int(delivery["disconnects"]),
        "delivered_per_s": delivery["rate"],
        "measure_seconds": delivery["windowSeconds"],
        "drain_seconds": delivery["drainSeconds"],
        "server_cpu_seconds": cpu,
        "server_cpu_per_msg_s": cpu / delivered if delivered else None,
        "server_rss_before_kib": pre.rss_kib,
        "server_rss_connected_kib": mid.rss_kib,
        "server_rss_after_kib": end.rss_kib,
        "server_rss_per_conn_kib": rss_delta / connected if connected else None,
        "server_processes": len(mid.pids),
        "server_breakdown": breakdown,
        "server_workers_flag": workers,
        **{f"handoffs_{k}": int(v) for k, v in (samples.handoffs or {}).items()},
        "loadgen_cpu_utilization": raw["loadgen"]["cpuUtilization"],
        "loadgen_loop_delay_p99_ms": raw["loadgen"]["eventLoopDelayMs"]["p99"],
        "loadgen_loop_delay_max_ms": raw["loadgen"]["eventLoopDelayMs"]["max"],
        "protocol_problems": raw["protocol"]["problemCounts"],
        "protocol_samples": raw["protocol"]["problemSamples"],
        "first_client_frames": raw["protocol"]["firstClientFrames"],
        "publish_first_response": pub["firstResponse"],
        "publish_error_samples": pub["samples"],
    }


# (key, label, higher_is_better, scale)
TABLE_ROWS: list[tuple[str, str, bool | None, float]] = [
    ("connect_rate", "connect rate (conn/s)", True, 1.0),
    ("latency_p50_ms", "latency p50 (ms)", False, 1.0),
    ("latency_p95_ms", "latency p95 (ms)", False, 1.0),
    ("latency_p99_ms", "latency p99 (ms)", False, 1.0),
    ("latency_max_ms", "latency max (ms)", False, 1.0),
    ("delivered_per_s", "delivered msg/s", True, 1.0),
    ("delivered", "delivered msgs", None, 1.0),
    ("lost", "lost msgs", False, 1.0),
    ("server_cpu_per_msg_s", "server CPU per delivered msg (µs)", False, 1e6),
    ("server_rss_per_conn_kib", "server RSS per connection (KiB)", False, 1.0),
    ("published", "events published", None, 1.0),
    ("loadgen_cpu_utilization", "load generator CPU (fraction of 1 core)", None, 1.0),
    ("loadgen_loop_delay_max_ms", "load generator event-loop delay max (ms)", None, 1.0),
]


def fmt(value: Any, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    v = value * scale
    if isinstance(value, int) and scale == 1.0:
        return f"{value:,}"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return "—"
    if b == 0:
        return "=" if a == 0 else "∞"
    return f"{a / b:.2f}x"


def render_table(scenario: Scenario, results: dict[str, dict[str, Any]]) -> str:
    servers = list(results)
    ratio_cols = [s for s in servers if s.startswith("roomcast")] if "node" in results else []
    # The workers target compares two workers with one on the same (Redis) broker.
    workers_ratio = "roomcast-w2" in results and "roomcast-redis" in results
    header = ["metric", *servers, *[f"{s}/node" for s in ratio_cols]]
    if workers_ratio:
        header.append("roomcast-w2/roomcast-redis")
    lines = [
        f"### {scenario.name}: {scenario.clients:,} clients, {scenario.rooms:,} room(s), "
        + (
            f"closed loop ({scenario.inflight} events in flight)"
            if scenario.mode == "closed"
            else f"{scenario.rate:g} events/s per room"
        )
        + f", {scenario.duration:g} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for key, label, better, scale in TABLE_ROWS:
        arrow = "" if better is None else (" ↑" if better else " ↓")
        cells = [label + arrow]
        for s in servers:
            r = results[s]
            cells.append("error (see notes)" if "error" in r else fmt(r.get(key), scale))
        for s in ratio_cols:
            rs, rn = results[s], results["node"]
            cells.append("—" if "error" in rs or "error" in rn else ratio(rs.get(key), rn.get(key)))
        if workers_ratio:
            rw, r1 = results["roomcast-w2"], results["roomcast-redis"]
            cells.append("—" if "error" in rw or "error" in r1 else ratio(rw.get(key), r1.get(key)))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def scenario_notes(results: dict[str, dict[str, Any]], pinning: Pinning) -> list[str]:
    notes = [pinning.note + "."]
    for name, r in results.items():
        notes.append(f"{name}: {SERVER_SPECS[name].description}.")
        if "rounds" in r and "error" not in r:
            p95s = ", ".join(fmt(x.get("latency_p95_ms"), 1) for x in r["rounds"])
            cpus = ", ".join(fmt(x.get("server_cpu_per_msg_s"), 1e6) for x in r["rounds"])
            notes.append(
                f"{name}: median of {len(r['rounds'])} rounds; per round, p95 (ms): {p95s}; "
                f"server CPU per message (µs): {cpus}."
            )
        if "handoffs_sent" in r:
            notes.append(
                f"{name}: sessions that moved to the worker owning their room, once all joined: "
                f"{fmt(r['handoffs_sent'])} moved, "
                f"{fmt(r['handoffs_kept'])} stayed, {fmt(r['handoffs_failed'])} failed."
            )
        if SERVER_SPECS[name].workers > 1 and pinning.enabled:
            notes.append(
                f"{name}: all {SERVER_SPECS[name].workers} workers share the server CPU(s) "
                f"{pinning.server_cpus}."
            )
        if "error" in r:
            notes.append(f"{name}: FAILED: {r['error']}")
            continue
        util = r.get("loadgen_cpu_utilization")
        if isinstance(util, float) and util > 0.9:
            notes.append(
                f"{name}: load generator used {util:.0%} of its core: it may be the "
                "bottleneck, so throughput/latency are a lower bound for this server."
            )
        problems = r.get("protocol_problems") or {}
        if problems:
            notes.append(f"{name}: protocol problems {problems}; samples:")
            notes.extend(f"    {json.dumps(s)}" for s in r.get("protocol_samples", [])[:5])
        for key in ("connect_failed", "join_failed", "publish_errors", "duplicates", "misrouted"):
            if r.get(key):
                notes.append(f"{name}: {key} = {r[key]}")
        if r.get("publish_errors"):
            notes.extend(f"    {s}" for s in r.get("publish_error_samples", [])[:3])
    return notes


# ---------------------------------------------------------------------------
# Main


def run_one(ctx: Context, spec: ServerSpec, scenario: Scenario) -> dict[str, Any]:
    log(f"{scenario.name}: starting {spec.name}")
    server = start_server(ctx, spec, scenario)
    try:
        log(f"{scenario.name}: {spec.name} ready on port {server.port}; running load generator")
        raw, samples = run_loadgen(ctx, spec, scenario, server)
    finally:
        t0 = time.monotonic()
        server.stop()
        if time.monotonic() - t0 > 1:
            log(f"{scenario.name}: {spec.name} took {time.monotonic() - t0:.1f} s to stop")
    metrics = compute_metrics(scenario, raw, samples, spec.workers)
    metrics["raw"] = raw
    log(
        f"{scenario.name}: {spec.name}: delivered {metrics['delivered']:,}/"
        f"{metrics['expected']:,}, lost {metrics['lost']:,}, "
        f"{fmt(metrics['delivered_per_s'])} msg/s, p99 {fmt(metrics['latency_p99_ms'])} ms"
    )
    return metrics


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark Roomcast against a reference Node socket.io server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--scenario",
        choices=[*SCENARIOS, "all"],
        default=None,
        help="scenario to run (default: all)",
    )
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated servers, from {', '.join(SERVER_SPECS)}",
    )
    p.add_argument("--clients", type=int, help="override the scenario's connection count")
    p.add_argument("--rooms", type=int, help="override the scenario's room count")
    p.add_argument("--rate", type=float, help="override events/s per room (rate scenarios)")
    p.add_argument("--duration", type=float, help="override the publish phase length (s)")
    p.add_argument(
        "--inflight",
        type=int,
        help="events kept in flight by the closed-loop publisher (saturated)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"CI size: {SMOKE_CLIENTS} connections, {SMOKE_ROOMS} rooms (collab), "
        f"{SMOKE_DURATION:g} s, every scenario unless --scenario is given",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every scenario/server pair this many times (rounds interleave the servers) "
        "and report the median of each figure; losses and errors are the worst round's",
    )
    p.add_argument("--json-out", type=Path, help="also write the JSON results here")
    p.add_argument("--payload-bytes", type=int, default=200, help="JSON size of event data")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=200,
        help="connection handshakes kept in flight while connecting",
    )
    p.add_argument(
        "--http-sockets",
        type=int,
        default=32,
        help="keep-alive sockets of the publisher's HTTP agent",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="max seconds to wait for outstanding deliveries after publishing",
    )
    p.add_argument(
        "--loadgen-procs",
        type=int,
        default=1,
        help="load generator processes (receiver shards forked from one publisher)",
    )
    p.add_argument(
        "--token-mode",
        choices=["auth", "query", "both"],
        default="auth",
        help="how Roomcast clients pass the JWT: 40{token} payload, ?token=, or both",
    )
    p.add_argument("--server-cpus", default="0", help="taskset CPU list for the server")
    p.add_argument("--loadgen-cpus", default="1", help="taskset CPU list for the load generator")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument(
        "--shared-token",
        action="store_true",
        help="give every Roomcast client the same JWT (default: a distinct JWT per client)",
    )
    p.add_argument(
        "--redis-url",
        default="",
        help="use this Redis for the Redis-backed Roomcast variants instead of starting a "
        "private redis-server (its CPU/RSS are then not measured)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="max seconds to wait for a server's /healthz",
    )
    args = p.parse_args(argv)
    if args.scenario is None:
        args.scenario = "all"
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in SERVER_SPECS]
    if unknown or not servers:
        p.error(f"unknown server(s) {unknown}; choose from {', '.join(SERVER_SPECS)}")
    args.server_list = servers
    return args


WORST_OF_ROUNDS = (
    "lost",
    "handoffs_failed",
    "duplicates",
    "misrouted",
    "disconnects",
    "connect_failed",
    "join_failed",
    "publish_errors",
)
"""Counts of things that went wrong: with --repeat, the worst round's, never a median."""


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds: the median of each number, the maximum of each count of
    failures; any failed round fails the whole. The rounds stay in ``rounds``."""
    if len(rounds) == 1:
        return rounds[0]
    failed = [r for r in rounds if "error" in r]
    if failed:
        return {
            "error": f"{len(failed)} of {len(rounds)} rounds failed: {failed[0]['error']}",
            "rounds": rounds,
        }
    merged: dict[str, Any] = {}
    for key, first in rounds[0].items():
        values = [r.get(key) for r in rounds]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and key in WORST_OF_ROUNDS:
            merged[key] = max(values)
        elif numeric:
            merged[key] = statistics.median(values)
        else:
            merged[key] = first
    merged["rounds"] = rounds
    return merged


def iter_runs(
    scenarios: list[Scenario], servers: list[str]
) -> Iterator[tuple[Scenario, ServerSpec]]:
    for sc in scenarios:
        for name in servers:
            yield sc, SERVER_SPECS[name]


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node not found: install Node.js >= 18")
    ensure_node_deps()
    raise_fd_limit()
    scenarios = build_scenarios(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        args=args,
        node=node,
        pinning=decide_pinning(args),
        stamp=stamp,
        log_dir=log_dir,
        api_key="bench-" + secrets.token_hex(8),
        jwt_secret="bench-secret-" + secrets.token_hex(16),
    )
    if any(SERVER_SPECS[s].kind == "roomcast" for s in args.server_list):
        probe_roomcast(ctx)

    started = time.time()
    report: dict[str, Any] = {
        "started_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "node": node_version(node),
        },
        "pinning": asdict(ctx.pinning),
        "servers": {s: SERVER_SPECS[s].description for s in args.server_list},
        "roomcast_cli": ctx.roomcast,
        "scenarios": [],
    }
    failed = False
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for round_no in range(max(1, args.repeat)):
        if args.repeat > 1:
            log(f"round {round_no + 1} of {args.repeat}")
        for sc, spec in iter_runs(scenarios, args.server_list):
            try:
                result = run_one(ctx, spec, sc)
            except (BenchError, OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
                failed = True
                log(f"{sc.name}: {spec.name} FAILED: {exc}")
                result = {"error": str(exc)}
            rounds.setdefault(sc.name, {}).setdefault(spec.name, []).append(result)
    per_scenario = {
        name: {server: combine_rounds(runs) for server, runs in by_server.items()}
        for name, by_server in rounds.items()
    }

    tables: list[str] = []
    for sc in scenarios:
        results = per_scenario.get(sc.name, {})
        table = render_table(sc, results)
        notes = scenario_notes(results, ctx.pinning)
        tables.append(table + "\n\n" + "\n".join(f"- {n}" for n in notes))
        report["scenarios"].append(
            {"scenario": asdict(sc), "results": results, "markdown": table, "notes": notes}
        )
    report["elapsed_seconds"] = time.time() - started

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stamp}.json"
    text = json.dumps(report, indent=2, default=str)
    path.write_text(text + "\n")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    out("\n\n".join(tables))
    out(f"\nResults: {path} (logs in {log_dir}); total {report['elapsed_seconds']:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
