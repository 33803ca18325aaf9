"""The embedded in-memory broker: one process, no dependencies, the default."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections import OrderedDict, deque

from roomcast.broker.base import (
    Admission,
    BatchScope,
    BrokerState,
    ControlHandler,
    DeliveryHandler,
    History,
    Publication,
    PublishRequest,
    PublishResult,
    UserQuota,
)
from roomcast.broker.offsets import OffsetClock, parse_offset
from roomcast.broker.topics import validate_topic

log = logging.getLogger("roomcast.broker")


class MemoryBroker:
    """Publications go straight to the local handler; recent ones are kept per room for recovery.

    Offsets are Redis-style ``<ms>-<seq>`` ids from one process-wide clock, so they are globally
    ordered and recovery is exact.
    """

    def __init__(
        self,
        *,
        history_size: int = 1000,
        history_ttl_ms: int = 120_000,
        idempotency_window_ms: int = 300_000,
    ) -> None:
        self._handler: DeliveryHandler | None = None
        self._state = BrokerState.STOPPED
        self._clock = OffsetClock()
        self._history_size = history_size
        self._history_ttl_ms = history_ttl_ms
        self._idempotency_window_ms = idempotency_window_ms
        self._history: dict[str, deque[Publication]] = {}
        self._trimmed: dict[str, str] = {}
        """Per room, the offset of the newest publication dropped from history."""
        self._subscribed: set[str] = set()
        self._idempotency: OrderedDict[tuple[str, str], tuple[int, PublishResult]] = OrderedDict()
        """(room, idempotency key) -> when and what it published; keys are scoped per room."""
        self._sessions: dict[str, tuple[float, bytes]] = {}
        self._next_sweep = 0.0
        self._next_history_sweep_ms = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.upstream: deque[tuple[str, dict[str, str | bytes]]] = deque(maxlen=10_000)
        self.instance_id = uuid.uuid4().hex[:16]
        self._revocations: dict[str, int] = {}
        self._control: ControlHandler | None = None
        self._connects: dict[str, tuple[float, int]] = {}
        """User -> (end of the current window, connects counted in it)."""
        self._held: dict[str, dict[str, float]] = {}
        """User -> held connection -> until when (monotonic seconds)."""

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is BrokerState.CONNECTED

    async def start(self, handler: DeliveryHandler, *, batch: BatchScope | None = None) -> None:
        """``batch`` is not used: this broker delivers each publication as it is published."""
        self._handler = handler
        self._state = BrokerState.CONNECTED

    async def stop(self) -> None:
        self._handler = None
        self._state = BrokerState.STOPPED

    async def revoke(self, entry: str, until_ms: int) -> None:
        self._revocations[entry] = max(until_ms, self._revocations.get(entry, 0))

    async def revocations(self) -> list[str]:
        now_ms = int(time.time() * 1000)
        for entry in [e for e, until in self._revocations.items() if until <= now_ms]:
            del self._revocations[entry]
        return list(self._revocations)

    def on_control(self, handler: ControlHandler) -> None:
        self._control = handler

    async def send_control(self, message: bytes, instance: str | None = None) -> None:
        """The only instance is this one: the message is handled once the caller yields."""
        if instance not in (None, self.instance_id):
            return  # no such instance: lost, as on Redis
        handler = self._control
        if handler is not None and self._state is BrokerState.CONNECTED:
            asyncio.get_running_loop().call_soon(handler, message)

    async def instances(self) -> list[str]:
        return [self.instance_id] if self._state is BrokerState.CONNECTED else []

    async def publish(self, request: PublishRequest) -> PublishResult:
        validate_topic(request.topic)
        now_ms = int(time.time() * 1000)
        key = request.idempotency_key
        if key is not None:
            self._expire_idempotency(now_ms)
            seen = self._idempotency.get((request.topic, key))
            if seen is not None:
                return PublishResult(id=seen[1].id, offset=seen[1].offset, duplicate=True)
        offset = self._clock.next(now_ms)
        publication = Publication(
            room=request.room,
            namespace=request.namespace,
            event=request.event,
            data=request.data,
            id=offset,
            offset=offset,
            idempotency_key=key,
            traceparent=request.traceparent,
            published_at_ms=now_ms,
            exclude_sid=request.exclude_sid,
        )
        self._remember(publication, now_ms)
        result = PublishResult(id=publication.id, offset=offset)
        if key is not None:
            self._idempotency[(request.topic, key)] = (now_ms, result)
        if self._handler is not None and request.topic in self._subscribed:
            try:
                self._handler(publication)
            except Exception:  # a delivery boundary: the publication is stored; log and count
                self.dropped["delivery_failed"] += 1
                log.exception(
                    "local delivery of %s to %s failed", publication.id, publication.topic
                )
        return result

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    async def history(self, room: str, after_offset: str) -> History:
        after = parse_offset(after_offset)
        now_ms = int(time.time() * 1000)
        kept = self._history.get(room)
        if kept is not None:
            self._trim(room, kept, now_ms)
        trimmed = self._trimmed.get(room)
        if trimmed is not None:
            complete = parse_offset(trimmed) <= after
        elif room in self._history:
            complete = True  # nothing of this room was ever dropped
        else:
            # Never published to, or swept long ago: as for Redis, anything published after
            # `after` would still be kept if `after` is younger than the history's lifetime.
            complete = after == (0, 0) or now_ms - after[0] < self._history_ttl_ms
        found = [p for p in kept or () if parse_offset(p.offset) > after]
        return History(publications=found, complete=complete)

    async def save_session(self, pid: str, state: bytes, ttl_ms: int) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:  # amortised: a sweep at most once a second
            self._next_sweep = now + 1.0
            self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
        self._sessions.pop(pid, None)  # re-insert: dict order stays roughly by deadline
        self._sessions[pid] = (now + ttl_ms / 1000, state)

    async def take_session(self, pid: str) -> bytes | None:
        entry = self._sessions.pop(pid, None)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def write_sessions(self, items: list[tuple[str, bytes | None, int]]) -> None:
        for pid, state, ttl_ms in items:
            if state is None:
                self._sessions.pop(pid, None)
            else:
                await self.save_session(pid, state, ttl_ms)

    async def touch_sessions(self, pids: list[str], ttl_ms: int) -> None:
        deadline = time.monotonic() + ttl_ms / 1000
        for pid in pids:
            entry = self._sessions.get(pid)
            if entry is not None:
                self._sessions[pid] = (deadline, entry[1])

    async def admit_user(self, user: str, member: str, quota: UserQuota) -> Admission:
        """The same fixed window and held set as on Redis, in this process."""
        now = time.monotonic()
        if quota.per_window:
            if len(self._connects) > 10_000:  # windows that ended: forget them (amortised)
                self._connects = {u: w for u, w in self._connects.items() if w[0] > now}
            ends, count = self._connects.get(user, (0.0, 0))
            if ends <= now:
                ends, count = now + quota.window_ms / 1000, 0
            self._connects[user] = (ends, count + 1)
            if count + 1 > quota.per_window:
                return Admission("user_connect_rate", max(1, int((ends - now) * 1000)))
        if quota.concurrent:
            held = self._held.setdefault(user, {})
            if member not in held and len(held) >= quota.concurrent:
                for gone in [m for m, until in held.items() if until <= now]:  # only when full
                    del held[gone]
                if len(held) >= quota.concurrent:
                    return Admission("user_connections")
            held[member] = now + quota.ttl_ms / 1000
        return Admission()

    async def release_users(self, held: list[tuple[str, str]]) -> None:
        for user, member in held:
            members = self._held.get(user)
            if members is not None:
                members.pop(member, None)
                if not members:
                    del self._held[user]

    async def keep_users(self, held: list[tuple[str, str]], ttl_ms: int) -> None:
        until = time.monotonic() + ttl_ms / 1000
        for user, member in held:
            self._held.setdefault(user, {})[member] = until

    async def append_upstream(self, fields: dict[str, str | bytes]) -> str:
        """Kept in a bounded local list; only useful for tests and development."""
        offset = self._clock.next(int(time.time() * 1000))
        self.upstream.append((offset, fields))
        return offset

    def _remember(self, publication: Publication, now_ms: int) -> None:
        kept = self._history.setdefault(publication.topic, deque())
        kept.append(publication)
        self._trim(publication.topic, kept, now_ms)
        if now_ms >= self._next_history_sweep_ms:
            # Rooms nobody publishes to any more: drop their expired history (at most 1/s).
            self._next_history_sweep_ms = now_ms + 1000
            oldest_allowed = now_ms - self._history_ttl_ms
            for room in [
                r for r, k in self._history.items() if k[-1].published_at_ms < oldest_allowed
            ]:
                self._trim(room, self._history[room], now_ms)
            self._trimmed = {r: o for r, o in self._trimmed.items() if r in self._history}

    def _trim(self, room: str, kept: deque[Publication], now_ms: int) -> None:
        oldest_allowed = now_ms - self._history_ttl_ms
        while kept and (len(kept) > self._history_size or kept[0].published_at_ms < oldest_allowed):
            self._trimmed[room] = kept.popleft().offset
        if not kept:
            del self._history[room]

    def _expire_idempotency(self, now_ms: int) -> None:
        oldest_allowed = now_ms - self._idempotency_window_ms
        while self._idempotency:
            key, (at_ms, _) = next(iter(self._idempotency.items()))
            if at_ms >= oldest_allowed:
                break
            del self._idempotency[key]
