"""The watcher side: this instance's Admin UI sockets, and what they are sent.

While one Admin UI socket is connected here, a loop asks every instance for its stats every
:data:`STATS_S` (``admin.watch``, which also renews this instance's lease on their
:class:`~roomcast.admin.tap.Tap`) and sends each answer to the UIs as ``server_stats``.

The UIs' socket lists come from a *sync*: ``admin.sockets`` to every instance, whose chunks are
joined, undecoded, into one ``all_sockets`` event.  It holds at most ``admin_socket_list_limit``
sockets (shared among the instances, the newest of each): the UI files its list with a linear
search per socket, so a list of n sockets costs the browser n² steps (17 s of one task for
10,000 in chromium; 0.7 s for 2,000); the dashboard's counts, from the stats, cover every
socket.  Feed events that arrive during a sync wait, and those already in it (by their
``seq``) are skipped; after it, feed events go to the UIs one by one, in order per instance.

A sync happens when a UI connects, and again (at most every :data:`MIN_RESYNC_S`) when the feed
shows a gap (a lost message, a burst dropped), an instance leaves or arrives, or more than
:data:`EVENT_BUDGET` events arrive within a second: past that rate single updates cost the
browser more than a fresh list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from roomcast.broker.base import BrokerError
from roomcast.cluster import Cluster
from roomcast.metrics import Metrics
from roomcast.operator import Selector
from roomcast.protocol.socketio import Packet, PacketType
from roomcast.socket import Socket
from roomcast.tasks import TaskSet

__all__ = ["EVENT_BUDGET", "MIN_RESYNC_S", "STATS_S", "Console"]

log = logging.getLogger("roomcast.admin")

STATS_S: Final = 2.0
MIN_RESYNC_S: Final = 5.0
EVENT_BUDGET: Final = 300
"""Feed events per second sent to the UIs one by one; past it they wait for a sync."""


class Console:
    def __init__(
        self,
        namespace: str,
        list_limit: int,
        cluster: Cluster,
        tasks: TaskSet,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._namespace = namespace
        self._list_limit = list_limit
        self._instances = 1
        """How many instances answered the last stats round (they share the list limit)."""
        self._cluster = cluster
        self._tasks = tasks
        self._metrics = metrics
        self._clock = clock
        self.admins: dict[str, Socket] = {}
        self._next: dict[str, int] = {}
        """Instance -> the ``seq`` of its next feed event (set by a sync)."""
        self._held: list[tuple[str, int, list[Any]]] | None = None
        """Feed messages that arrived during a sync (``None`` when there is none)."""
        self._chunks: dict[str, dict[str, list[str]]] = {}
        """Sync reference -> instance -> the chunks it sent so far."""
        self._sync_cause: str | None = None
        self._urgent = False
        self._last_sync = -float("inf")
        self._window = (0.0, 0)
        """(start of the current second, feed events sent in it)."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.min_resync_s = MIN_RESYNC_S
        self.event_budget = EVENT_BUDGET

    @property
    def instance(self) -> str:
        return self._cluster.instance

    # -- admin sockets ------------------------------------------------------------------------
    def add(self, socket: Socket) -> None:
        """A UI connected here: it gets stats and a socket list right away."""
        self.admins[socket.id] = socket
        self.want_sync("new_admin", urgent=True)
        if self._task is None:
            self._task = self._tasks.spawn(self._loop(), name="admin-console")

    def remove(self, socket: Socket) -> None:
        self.admins.pop(socket.id, None)
        self._wake.set()

    def want_sync(self, cause: str, *, urgent: bool = False) -> None:
        if self._sync_cause is None:
            self._sync_cause = cause
        self._urgent = self._urgent or urgent
        self._wake.set()

    # -- sending to the UIs -------------------------------------------------------------------
    def _send(self, data: list[Any]) -> None:
        """One event to every UI here, encoded once."""
        messages = Packet(PacketType.EVENT, self._namespace, data).serialize()
        for admin in list(self.admins.values()):
            if admin.connected:
                admin.conn.send_messages(messages)

    def _send_list(self, items: list[str]) -> None:
        """``all_sockets`` from JSON texts of items, without decoding them."""
        head = str(Packet(PacketType.EVENT, self._namespace).serialize()[0])
        message = head + '["all_sockets",[' + ",".join(items) + "]]"
        for admin in list(self.admins.values()):
            if admin.connected:
                admin.conn.send_messages([message])

    # -- the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            last_stats = -STATS_S
            while self.admins:
                now = self._clock()
                try:
                    if now - last_stats >= STATS_S:
                        last_stats = now
                        await self._watch()
                    if self._sync_cause is not None and (
                        self._urgent or self._clock() - self._last_sync >= self.min_resync_s
                    ):
                        await self._sync()
                except BrokerError as exc:  # the control channel is down: try again later
                    log.warning("admin: cannot reach the instances: %s", exc)
                    self.want_sync("broker_error")
                    self._urgent = False
                now = self._clock()
                delay = last_stats + STATS_S - now
                if self._sync_cause is not None:
                    delay = min(delay, self._last_sync + self.min_resync_s - now)
                self._wake.clear()
                if self.admins and delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
        finally:
            self._task = None
            self._next.clear()
            self._held = None
            self._sync_cause = None
            self._urgent = False

    async def _watch(self) -> None:
        results, missing = await self._cluster.request(
            "admin.watch",
            Selector(),
            {"watcher": self.instance},
            self._cluster.answer_timeout_s,
        )
        answered: set[str] = set()
        for result in results:
            instance, stats = result.get("instance"), result.get("stats")
            if not isinstance(instance, str) or not isinstance(stats, dict):
                continue
            answered.add(instance)
            if instance not in self._next and self._held is None:
                self.want_sync("instance_new")
            elif result.get("fresh") is True:
                self.want_sync("lease_lapsed")
            self._send(["server_stats", stats])
        self._instances = max(len(answered) + len(missing), 1)
        gone = set(self._next) - answered - set(missing)
        if gone:
            for instance in gone:
                del self._next[instance]
            log.info("admin: instances %s left; the UIs resync", sorted(gone))
            self.want_sync("instance_gone")

    async def _sync(self) -> None:
        cause = self._sync_cause or "new_admin"
        self._sync_cause = None
        self._urgent = False
        self._last_sync = self._clock()
        ref = uuid.uuid4().hex
        self._chunks[ref] = {}
        self._held = []
        try:
            results, missing = await self._cluster.request(
                "admin.sockets",
                Selector(),
                {
                    "watcher": self.instance,
                    "ref": ref,
                    "limit": -(-self._list_limit // self._instances),
                },
                self._cluster.answer_timeout_s,
            )
        except BaseException:
            self._held = None  # live events flow again; the next refresh tries anew
            self._chunks.pop(ref, None)
            raise
        chunks = self._chunks.pop(ref)
        held, self._held = self._held, None
        items: list[str] = []
        total = 0
        self._next = {}
        for result in results:
            instance, seq, count = result.get("instance"), result.get("seq"), result.get("chunks")
            total += int(result.get("total", 0))
            if not isinstance(instance, str) or not isinstance(seq, int):
                continue
            texts = chunks.get(instance, [])
            if len(texts) != count:
                log.warning("admin: %s sent %d of %s chunks", instance, len(texts), count)
                self.want_sync("chunks_lost")
            items.extend(text for text in texts if text)
            self._next[instance] = seq + 1
        if missing:
            self.want_sync("instance_missing")
        self._send_list(items)
        self._metrics.admin_resyncs.labels(cause).inc()
        if total > self._list_limit:
            log.info(
                "admin: socket list of %d sockets sent as the newest %d (admin_socket_list_limit)",
                total,
                self._list_limit,
            )
        self._window = (self._clock(), 0)
        for instance, first, events in held or ():
            self._apply(instance, first, events)

    # -- control messages ---------------------------------------------------------------------
    def on_chunk(self, body: dict[str, Any]) -> None:
        ref, instance, data = body.get("ref"), body.get("from"), body.get("data")
        sync = self._chunks.get(ref) if isinstance(ref, str) else None
        if sync is None or not isinstance(instance, str) or not isinstance(data, str):
            self._metrics.dropped.labels("admin_chunk_late").inc()
            log.info("admin: dropped a socket list chunk of no sync in progress")
            return
        sync.setdefault(instance, []).append(data)

    def on_feed(self, body: dict[str, Any]) -> None:
        instance, first, events = body.get("from"), body.get("first"), body.get("events")
        if (
            not isinstance(instance, str)
            or not isinstance(first, int)
            or not isinstance(events, list)
        ):
            self._metrics.dropped.labels("bad_control_message").inc()
            log.info("admin: dropped a malformed feed message")
            return
        if not self.admins:
            return  # the tap's lease outlives the last UI by a few seconds
        if self._held is not None:
            self._held.append((instance, first, events))
        else:
            self._apply(instance, first, events)

    def _apply(self, instance: str, first: int, events: list[Any]) -> None:
        expected = self._next.get(instance)
        if expected is None:
            self.want_sync("instance_new")
            return
        for offset, event in enumerate(events):
            seq = first + offset
            if seq < expected:
                continue  # in the last sync already
            if seq > expected:
                log.info("admin: %d events of %s lost; the UIs resync", seq - expected, instance)
                self.want_sync("gap")
            expected = seq + 1
            if isinstance(event, list) and event and self._within_budget():
                self._send(event)
        self._next[instance] = expected

    def _within_budget(self) -> bool:
        start, count = self._window
        now = self._clock()
        if now - start >= 1.0:
            start, count = now, 0
        self._window = (start, count + 1)
        if count < self.event_budget:
            return True
        if count == self.event_budget:
            log.info("admin: over %d events/s; the UIs get a fresh list instead", count)
        self.want_sync("burst")
        return False
