"""Recovery states of sockets: where each is kept (bound to its user) and the writer that
saves them to the broker in batches, coalescing per socket."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable

from roomcast.broker.base import Broker, BrokerError
from roomcast.metrics import Metrics
from roomcast.tasks import TaskSet

log = logging.getLogger("roomcast.sockets")

PID_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
"""What a private session id (``pid``) looks like: ours are ``secrets.token_urlsafe(15)``."""


def session_key(pid: str, user_id: str) -> str:
    """The broker key of a recovery state: the pid bound to its user, so that a pid presented
    with another user's token finds nothing (and cannot take or wipe the owner's state)."""
    return f"{pid}.{hashlib.blake2b(user_id.encode(), digest_size=8).hexdigest()}"


class SessionWriter:
    """Writes recovery states to the broker from one task, coalescing per socket.

    A thousand sockets joining (or a mass disconnect) become a few pipelined batches,
    not a thousand tasks; only the newest state of a socket is written.
    """

    BATCH = 500

    def __init__(self, broker: Broker, metrics: Metrics, tasks: TaskSet) -> None:
        self._broker = broker
        self._metrics = metrics
        self._tasks = tasks
        self._pending: dict[str, tuple[Callable[[], bytes] | None, int]] = {}
        self._writing: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    def put(self, pid: str, state: Callable[[], bytes] | None, ttl_ms: int) -> None:
        """Queue a state to save, made by ``state()`` when written (``None``: delete it)."""
        self._pending[pid] = (state, ttl_ms)
        if self._wake is None:
            self._wake, self._idle = asyncio.Event(), asyncio.Event()
            self._tasks.spawn(self._run(), name="session-writer")
        assert self._idle is not None
        self._idle.clear()
        self._wake.set()

    def busy(self, pid: str) -> bool:
        """A state of ``pid`` is queued or being written."""
        return pid in self._pending or pid in self._writing

    async def flush(self) -> None:
        """Return once everything queued so far was written (or failed and was counted)."""
        if self._idle is not None:
            await self._idle.wait()

    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [
                    (pid, None if state is None else state(), ttl)
                    for pid, (state, ttl) in self._pending.items()
                ]
                self._pending = {}
                self._writing = {pid for pid, _, _ in batch}
                try:
                    for start in range(0, len(batch), self.BATCH):
                        await self._write(batch[start : start + self.BATCH])
                finally:
                    self._writing = set()
            self._idle.set()

    async def _write(self, items: list[tuple[str, bytes | None, int]]) -> None:
        try:
            await self._broker.write_sessions(items)
        except BrokerError as exc:
            self._metrics.recoveries.labels("save_failed").inc(len(items))
            log.warning("could not write %d recovery states: %s", len(items), exc)
