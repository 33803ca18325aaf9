"""New sessions take their turn: at most a slice of each event-loop iteration opens them.

In a reconnection storm thousands of handshakes arrive together. Run as they are read, one
loop iteration opened 500 sessions (0.4-0.8 ms each under load) and everything else waited:
health checks, heartbeats, the messages of established clients. :class:`Admission` queues
that work and runs it in arrival order for at most ``budget_s`` per iteration; the rest of
each iteration serves everyone else. An idle loop iterates back to back, so the queue then
drains as fast as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

BUDGET_S = 0.005
"""Seconds of session opening per loop iteration, at most (one job may overrun it)."""


class Admission:
    __slots__ = ("_budget", "_loop", "_queue", "_scheduled")

    def __init__(self, budget_s: float = BUDGET_S) -> None:
        self._budget = budget_s
        self._queue: deque[Callable[[], None]] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet run."""
        return len(self._queue)

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in a coming loop iteration, after those submitted before it."""
        self._queue.append(job)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        queue = self._queue
        deadline = time.perf_counter() + self._budget
        try:
            while queue:
                queue.popleft()()
                if time.perf_counter() >= deadline:
                    break
        finally:
            if queue:
                assert self._loop is not None
                self._loop.call_soon(self._run)  # the next iteration, after its I/O
            else:
                self._scheduled = False
