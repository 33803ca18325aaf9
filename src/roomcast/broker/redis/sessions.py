"""Recovery sessions in Redis: one string key per session, with a TTL.

A socket's recovery state is saved when it disconnects (or periodically) and taken, once,
by whichever instance the client reconnects to.
"""

from __future__ import annotations

from roomcast.broker.keys import Keys
from roomcast.broker.redis.connection import RedisConnection
from roomcast.broker.redis.errors import REDIS_FAILURES, broker_error

__all__ = ["RedisSessions"]


class RedisSessions:
    """Saves, takes and refreshes recovery sessions; every Redis failure is a BrokerError."""

    def __init__(self, connection: RedisConnection, keys: Keys) -> None:
        self._connection = connection
        self._keys = keys

    async def save(self, pid: str, state: bytes, ttl_ms: int) -> None:
        key = self._keys.session(pid)
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                await client.set(key, state, px=max(1, ttl_ms))
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def write(self, items: list[tuple[str, bytes | None, int]]) -> None:
        """Save (or, for a ``None`` state, delete) many sessions in one round trip."""
        if not items:
            return
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                pipe = client.pipeline(transaction=False)
                for pid, state, ttl_ms in items:
                    if state is None:
                        pipe.delete(self._keys.session(pid))
                    else:
                        pipe.set(self._keys.session(pid), state, px=max(1, ttl_ms))
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def take(self, pid: str) -> bytes | None:
        """The session's state, removed so that only one instance resumes it."""
        key = self._keys.session(pid)
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                value = await client.getdel(key)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        if value is None or isinstance(value, bytes):
            return value
        return str(value).encode()

    async def touch(self, pids: list[str], ttl_ms: int) -> None:
        if not pids:
            return
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                pipe = client.pipeline(transaction=False)
                for pid in pids:
                    pipe.pexpire(self._keys.session(pid), max(1, ttl_ms))
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
