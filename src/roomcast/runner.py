"""Serve one node until SIGTERM / SIGINT, then drain: what ``roomcast serve`` and each worker run.

Below the command line (which parses arguments and is the only module that exits the process)
and beside ``workers`` (which forks processes that each call :func:`run`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Any

from roomcast.app import Application
from roomcast.config import Settings
from roomcast.logs import configure as configure_logs
from roomcast.logs import identify
from roomcast.tracing import shutdown as shutdown_tracing

log = logging.getLogger("roomcast")


def run(
    settings: Settings,
    app: Application | None,
    sock: Any = None,
    mounts: dict[str, Any] | None = None,
    worker: tuple[int, tuple[str, ...]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain (a second signal hurries the drain).  ``mounts``
    adds raw Engine.IO apps by path."""
    configure_logs(settings.log_level, settings.log_format, settings.secret_values())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_run(settings, app, sock, mounts or {}, worker))
    finally:
        shutdown_tracing()  # export the spans still queued


async def _run(
    settings: Settings,
    app: Application | None,
    sock: Any,
    mounts: dict[str, Any],
    worker: tuple[int, tuple[str, ...]] | None,
) -> None:
    from roomcast.node import Node

    node = Node(settings, app, worker=worker)
    identify(instance=node.broker.instance_id, worker=f"{worker[0]:02d}" if worker else "")
    for path, factory in mounts.items():
        node.mount_engine(path, factory)
    _tune_gc()
    await node.start(sock)
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set() and not hurry.is_set():
            log.info("second signal: clients are told to leave now")
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    # A worker answers SIGTERM alone: its supervisor forwards it, and a terminal's Ctrl-C
    # (which reaches the whole process group) would otherwise count as a second signal.
    for sig in (signal.SIGTERM,) if worker is not None else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # One write() even with an unbuffered stdout (PYTHONUNBUFFERED), where print() writes the
    # text and its newline separately: the workers share the pipe, and their lines interleaved.
    if node.ops_port is not None:
        host = settings.ops_listen.rpartition(":")[0]
        sys.stdout.write(f"roomcast ops on {host}:{node.ops_port} (pid {os.getpid()})\n")
    sys.stdout.write(f"roomcast ready on {settings.host}:{node.port} (pid {os.getpid()})\n")
    sys.stdout.flush()
    await stop.wait()
    await node.drain(hurry)
    await node.stop()


def _tune_gc() -> None:
    """Keep the cyclic garbage collector out of the broadcast path.

    The hot path creates no reference cycles, so young-generation collections find little; with
    10,000 connections a full collection walks every connection's objects and stalls the loop.
    Everything alive at start-up moves to the permanent generation, and collections run less
    often. Full collections still come every ~20 million allocations: a closed connection's
    objects form reference cycles (protocol <-> parser, session <-> websocket peer), and under
    heavy churn they must not wait long to be reclaimed.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
