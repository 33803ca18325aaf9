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
from multiprocessing.process import BaseProcess
from pathlib import Path

from roomcast.app import Application
from roomcast.config import ConfigError, Settings
from roomcast.handoff import datagram_path

log = logging.getLogger("roomcast.workers")


def run_workers(settings: Settings, app: Application | None) -> int:
    if not settings.redis_url:
        raise ConfigError("workers > 1 needs a shared broker: set redis_url")
    runtime = Path(tempfile.mkdtemp(prefix="roomcast-"))
    sockets = tuple(str(runtime / f"worker-{i}.sock") for i in range(settings.workers))
    context = multiprocessing.get_context("fork")
    stopping = False

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker, args=(settings, app, index, sockets), name=f"roomcast-worker-{index}"
        )
        process.start()
        return process

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    processes = [start(i) for i in range(settings.workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for index, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                log.error("worker %d exited with %s; restarting it", index, process.exitcode)
                processes[index] = start(index)
        if stopping and not any(p.is_alive() for p in processes):
            break
        time.sleep(0.2)
    for path in sockets:
        Path(path).unlink(missing_ok=True)
        Path(datagram_path(path)).unlink(missing_ok=True)
    runtime.rmdir()
    return 0


def _worker(
    settings: Settings, app: Application | None, index: int, sockets: tuple[str, ...]
) -> None:
    from roomcast.cli import run

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(settings, app, worker=(index, sockets))
