"""``roomcast serve --workers N``: N processes accept on one port (SO_REUSEPORT).

Every worker runs a whole node against the shared Redis broker, so a publication reaches members
on every worker.  A polling client sends each request on a new or pooled TCP connection, which
the kernel may give to any worker: session ids therefore start with the owning worker's number,
and a worker that receives a request for another worker's session pipes that connection to the
owner over a unix socket.  WebSocket clients never need this (one connection for the session);
a WebSocket session may instead move, connection and all, to the worker that owns its first room
(``handoff.py``), so that a room's members gather on one worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from roomcast.app import Application
from roomcast.config import ConfigError, Settings
from roomcast.handoff import datagram_path
from roomcast.http.peers import peer_path
from roomcast.runner import run

log = logging.getLogger("roomcast.workers")


QUICK_CRASH_S = 10.0
"""A worker that exits within this many seconds of its start crashed quickly."""
MAX_QUICK_CRASHES = 5
"""Quick crashes in a row after which the supervisor gives up on the whole instance."""
BACKOFF_S = (0.5, 30.0)
"""First and longest wait before a quickly crashed worker is started again (doubling)."""


def run_workers(settings: Settings, app: Application | None) -> int:
    if not settings.redis_url:
        raise ConfigError("workers > 1 needs a shared broker: set redis_url")
    runtime = Path(tempfile.mkdtemp(prefix="roomcast-"))
    sockets = tuple(str(runtime / f"worker-{i}.sock") for i in range(settings.workers))
    context = multiprocessing.get_context("fork")

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker, args=(settings, app, index, sockets), name=f"roomcast-worker-{index}"
        )
        process.start()
        return process

    try:
        return supervise(start, settings.workers)
    finally:
        for path in sockets:
            Path(path).unlink(missing_ok=True)
            Path(datagram_path(path)).unlink(missing_ok=True)
            Path(peer_path(path)).unlink(missing_ok=True)
        runtime.rmdir()


def supervise(
    start: Callable[[int], BaseProcess],
    count: int,
    *,
    quick_crash_s: float = QUICK_CRASH_S,
    max_quick_crashes: int = MAX_QUICK_CRASHES,
    backoff_s: tuple[float, float] = BACKOFF_S,
) -> int:
    """Run ``count`` workers until SIGTERM / SIGINT; restart one that exits, after a doubling
    wait while it keeps crashing quickly, and give up (stop all, return 1) after
    ``max_quick_crashes`` quick crashes in a row of one worker.  Returns the exit status."""
    stopping = False
    status = 0

    def stop_all() -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    processes = [start(i) for i in range(count)]
    started = [time.monotonic()] * count
    crashes = [0] * count
    restart_at: list[float | None] = [None] * count
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        now = time.monotonic()
        for index, process in enumerate(processes):
            if stopping or process.is_alive():
                continue
            if restart_at[index] is None:
                quick = now - started[index] < quick_crash_s
                crashes[index] = crashes[index] + 1 if quick else 0
                if crashes[index] >= max_quick_crashes:
                    log.error(
                        "worker %d exited with %s: %d quick crashes in a row; giving up",
                        index,
                        process.exitcode,
                        crashes[index],
                        extra={"worker": f"{index:02d}"},
                    )
                    stopping, status = True, 1
                    stop_all()
                    break
                delay = min(backoff_s[0] * 2 ** max(crashes[index] - 1, 0), backoff_s[1])
                delay = delay if crashes[index] else 0.0
                log.error(
                    "worker %d exited with %s; restarting it in %.1f s",
                    index,
                    process.exitcode,
                    delay,
                    extra={"worker": f"{index:02d}"},
                )
                restart_at[index] = now + delay
            deadline = restart_at[index]
            if deadline is not None and now >= deadline:
                restart_at[index] = None
                started[index] = now
                processes[index] = start(index)
        if stopping and not any(p.is_alive() for p in processes):
            return status
        time.sleep(0.1)


def _worker(
    settings: Settings, app: Application | None, index: int, sockets: tuple[str, ...]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(settings, app, worker=(index, sockets))
