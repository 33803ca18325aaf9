"""Rate limits: what one socket, one user and the publish API may do, and how a refusal is
counted and logged.

- :class:`Bucket`: a token bucket (``burst`` tokens, refilled at ``per_second``), one per
  socket and limit, and one per worker for the publish API.  A check is O(1), reads the
  monotonic clock once and needs no timer: the refill is computed from the time since the
  previous check.  Refusals fill a second, leaky count (:meth:`Bucket.overflowed`) that tells
  a socket that keeps going far over its limit, which is then disconnected.
- :class:`UserConnections`: new connections per user per window and connections per user at
  once, counted by the broker (on Redis, across every instance; see
  ``roomcast.broker.redis.users``), with the live sockets' holds kept alive from one task.
- :class:`Refusals`: every refusal counted in ``roomcast_rate_limited_total{limit}`` and logged
  at most once a second per limit.

``docs/operations.md`` ("Rate limits") lists every limit, its defaults and its cost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter

from roomcast.broker.base import Broker, BrokerError, UserQuota
from roomcast.metrics import Metrics
from roomcast.tasks import TaskSet

__all__ = [
    "Bucket",
    "Rate",
    "Refusal",
    "Refusals",
    "SocketRates",
    "UserConnections",
]

log = logging.getLogger("roomcast.limits")

_now = time.monotonic


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` sustained, up to ``burst`` at once."""

    per_second: float
    burst: float

    @classmethod
    def of(cls, per_second: float, burst: int) -> Rate | None:
        """The rate of two settings: None when ``per_second`` is 0 (no limit); a ``burst`` of
        0 means one second's worth (at least 1)."""
        if per_second <= 0:
            return None
        return cls(per_second, float(burst) if burst > 0 else max(1.0, math.ceil(per_second)))

    def bucket(self) -> Bucket:
        return Bucket(self)


class Bucket:
    """A token bucket; see the module's docstring."""

    __slots__ = ("_over", "_over_at", "rate", "stamp", "tokens")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.tokens = rate.burst
        self.stamp = _now()
        self._over = 0.0
        self._over_at = 0.0

    def take(self) -> bool:
        """Take one token: True if there was one (the event may go on)."""
        now = _now()
        rate = self.rate
        tokens = self.tokens + (now - self.stamp) * rate.per_second
        self.stamp = now
        if tokens > rate.burst:
            tokens = rate.burst
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def retry_after_ms(self) -> int:
        """How long until :meth:`take` would succeed (after a refusal), at least 1 ms."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate.per_second * 1000))

    def overflowed(self, factor: float) -> bool:
        """Count one refusal (call after :meth:`take` refused).  Refusals drain at the
        sustained rate; True once more than ``factor`` times the burst are left, that is once the
        socket went on at well over twice its rate for a while (0: never)."""
        now = self.stamp
        left = self._over - (now - self._over_at) * self.rate.per_second
        self._over = (left if left > 0.0 else 0.0) + 1.0
        self._over_at = now
        return factor > 0 and self._over > factor * self.rate.burst


@dataclass(frozen=True, slots=True)
class SocketRates:
    """The per-socket limits of ``SocketOptions``; None: no limit."""

    events: Rate | None = None
    """Every event a client sends (built-ins included)."""
    joins: Rate | None = None
    """``join`` events (each also counts as an event)."""
    disconnect_factor: float = 10.0
    """A socket refused ``disconnect_factor`` times the burst more than its rate refills is
    disconnected (see :meth:`Bucket.overflowed`); 0: never."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the client sees it: code ``rate_limited``, the limit and a retry-after."""

    limit: str
    retry_after_ms: int
    message: str


class _LogGate:
    """Logs one line per key at most every ``interval`` seconds, saying how many it skipped."""

    __slots__ = ("_interval", "_last", "_skipped")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, key: str, message: str, *args: object) -> None:
        now = _now()
        if now - self._last.get(key, -math.inf) < self._interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        suffix = f" (and {skipped} more in the last {self._interval:g} s)" if skipped else ""
        log.info(message + suffix, *args)


class Refusals:
    """Counts (``roomcast_rate_limited_total{limit}``) and logs (bounded) every refusal."""

    def __init__(self, metrics: Metrics) -> None:
        self._counter = metrics.rate_limited
        self._children: dict[str, Counter] = {}
        """The counter of each limit (``labels()`` costs a microsecond: not per refusal)."""
        self._gate = _LogGate()

    def refused(self, limit: str, who: str) -> None:
        child = self._children.get(limit)
        if child is None:
            child = self._children[limit] = self._counter.labels(limit)
        child.inc()
        self._gate.log(limit, "rate limited (%s): %s", limit, who)


@dataclass(slots=True)
class UserConnections:
    """New and concurrent connections per user (a namespace connect is one connection).

    :meth:`admit` counts and holds a socket before it connects; :meth:`release` lets it go
    when it closes (batched, from one task); :meth:`run` keeps the holds of this worker's live
    sockets alive every third of the TTL.  The anonymous user (no authentication) is never
    limited.  When the broker fails, a connect is admitted unchecked, counted in
    ``roomcast_rate_limit_errors_total{op}`` and logged: a limiter must not take the gateway
    down with Redis; the live sockets' holds are written again by the next keep-alive.
    """

    broker: Broker
    metrics: Metrics
    tasks: TaskSet
    quota: UserQuota = field(default_factory=UserQuota)
    refusals: Refusals | None = None
    _pending: dict[str, str] = field(default_factory=dict)
    """Member -> user, admitted but not connected yet (released if it never connects)."""
    _released: list[tuple[str, str]] = field(default_factory=list)
    _gate: _LogGate = field(default_factory=_LogGate)

    @property
    def enabled(self) -> bool:
        return bool(self.quota.per_window or self.quota.concurrent)

    async def admit(self, user: str, member: str) -> Refusal | None:
        """Count a connect of ``user`` as ``member``; a :class:`Refusal` if over a limit."""
        if not self.enabled or not user:
            return None
        try:
            admission = await self.broker.admit_user(user, member, self.quota)
        except BrokerError as exc:
            self.metrics.rate_limit_errors.labels("admit").inc()
            self._gate.log("admit", "connect of %r admitted unchecked: %s", user[:40], exc)
            return None
        if admission.limit is None:
            if self.quota.concurrent:
                self._pending[member] = user
            return None
        if self.refusals is not None:
            self.refusals.refused(admission.limit, f"user {user[:40]!r}")
        if admission.limit == "user_connections":
            return Refusal(
                admission.limit,
                self.quota.ttl_ms // 3,
                f"user has {self.quota.concurrent} connections open, the most allowed",
            )
        return Refusal(
            admission.limit,
            admission.retry_after_ms,
            f"more than {self.quota.per_window} new connections of this user "
            f"in {self.quota.window_ms / 1000:g} s",
        )

    def connected(self, member: str) -> None:
        """The socket admitted as ``member`` connected: its hold is kept alive from now on."""
        self._pending.pop(member, None)

    def release(self, user: str, member: str) -> None:
        """The socket held as ``member`` closed (or never connected): let its slot go."""
        if not self.quota.concurrent or not user:
            return
        self._pending.pop(member, None)
        if not self._released:
            self.tasks.spawn(self._release(), name="limits-release")
        self._released.append((user, member))

    def abandoned(self, member: str) -> None:
        """A connect that may have been admitted as ``member`` failed later: release it."""
        user = self._pending.pop(member, None)
        if user is not None:
            self.release(user, member)

    async def _release(self) -> None:
        await asyncio.sleep(0)  # a mass disconnect: one batch
        held, self._released = self._released, []
        try:
            await self.broker.release_users(held)
        except BrokerError as exc:
            self.metrics.rate_limit_errors.labels("release").inc()
            log.warning("could not release %d connections (they expire): %s", len(held), exc)

    async def run(self, live: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Every third of the TTL, keep the holds of ``live()`` (this worker's connected
        sockets, ``(user, member)``) alive."""
        ttl_ms = self.quota.ttl_ms
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            held = [(user, member) for user, member in live() if user]
            if not held:
                continue
            try:
                await self.broker.keep_users(held, ttl_ms)
            except BrokerError as exc:
                self.metrics.rate_limit_errors.labels("keep").inc()
                log.warning("could not keep %d connections alive: %s", len(held), exc)
