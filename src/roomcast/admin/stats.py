"""One instance's ``server_stats``, as the Admin UI's dashboard and servers page show them.

Nothing here is counted on the delivery path: the figures are read from what the gateway
counts anyway, every time a watcher asks (every two seconds while an Admin UI is open).

* ``clientsCount`` / ``pollingClientsCount``: open Engine.IO sessions, and those without a
  WebSocket;
* ``namespaces``: connected sockets per namespace;
* ``aggregatedEvents``, since the same watcher last asked: ``rawConnection`` (sessions opened),
  ``rawDisconnection`` (sessions closed), ``packetsIn`` (client events), ``packetsOut``
  (messages written by broadcasts) and, on Linux, ``bytesIn`` / ``bytesOut``: what the process
  read and wrote (``/proc/self/io`` ``rchar`` / ``wchar``: clients, and the broker too).
"""

from __future__ import annotations

import os
import socket as socketlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from prometheus_client import Counter

from roomcast.connection import Connection
from roomcast.metrics import Metrics
from roomcast.sockets import SocketServer

__all__ = ["InstanceStats"]

PROC_IO: Final = Path("/proc/self/io")
FORGET_WATCHER_S: Final = 60.0


def _total(counter: Counter) -> float:
    return sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def _process_io() -> tuple[int, int] | None:
    """(bytes read, bytes written) by this process so far, or None off Linux."""
    try:
        text = PROC_IO.read_text()
    except OSError:
        return None
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    try:
        return int(fields["rchar"]), int(fields["wchar"])
    except (KeyError, ValueError):
        return None


class InstanceStats:
    """The stats of this instance, with deltas kept per watcher (each UI's own interval)."""

    def __init__(
        self,
        instance: str,
        sockets: SocketServer,
        metrics: Metrics,
        sessions: Callable[[], Iterable[Connection]],
        namespaces: Callable[[], Iterable[str]],
    ) -> None:
        self._instance = instance
        self._sockets = sockets
        self._metrics = metrics
        self._sessions = sessions
        """The Engine.IO connections of every endpoint (their ``ws`` says the transport)."""
        self._namespaces = namespaces
        self._started = time.monotonic()
        self._hostname = socketlib.gethostname()
        self._last: dict[str, tuple[float, list[float]]] = {}
        """Watcher -> (when it last asked, the counters then)."""

    def _counters(self, open_now: int) -> list[float]:
        metrics = self._metrics
        io = _process_io()
        opened = _total(metrics.connections_opened)
        return [
            opened,
            opened - open_now,  # closed (or handed over to another worker)
            _total(metrics.client_events),
            _total(metrics.delivered),
            float(io[0]) if io else -1.0,
            float(io[1]) if io else -1.0,
        ]

    def snapshot(self, watcher: str) -> dict[str, Any]:
        now = time.monotonic()
        sessions = list(self._sessions())
        counters = self._counters(len(sessions))
        previous = self._last.get(watcher)
        self._last[watcher] = (now, counters)
        for other, (seen, _) in list(self._last.items()):
            if now - seen > FORGET_WATCHER_S:
                del self._last[other]
        polling = sum(1 for conn in sessions if conn.ws is None)
        counts = dict.fromkeys(self._namespaces(), 0)
        for socket in self._sockets.sockets.values():
            name = socket.namespace.name
            counts[name] = counts.get(name, 0) + 1
        return {
            "serverId": self._instance,
            "hostname": self._hostname,
            "pid": os.getpid(),
            "uptime": round(now - self._started, 3),
            "clientsCount": len(sessions),
            "pollingClientsCount": polling,
            "aggregatedEvents": [] if previous is None else _events(previous[1], counters),
            "namespaces": [
                {"name": name, "socketsCount": count} for name, count in sorted(counts.items())
            ],
        }


_TYPES: Final = (
    "rawConnection",
    "rawDisconnection",
    "packetsIn",
    "packetsOut",
    "bytesIn",
    "bytesOut",
)


def _events(before: list[float], after: list[float]) -> list[dict[str, Any]]:
    timestamp = int(time.time()) * 1000
    events = []
    for kind, old, new in zip(_TYPES, before, after, strict=True):
        if old < 0 or new < 0:
            continue  # not known here (no /proc)
        count = int(new - old)
        if count > 0:
            events.append({"timestamp": timestamp, "type": kind, "count": count})
    return events
