"""Per-user connection counts in Redis, shared by every instance on it.

Two keys per user, in one cluster slot (the user is their hash tag):

- ``<prefix>:connects:{<user>}``: new connections in the current fixed window, an ``INCR``
  whose first increment sets the window's expiry (``PEXPIRE``);
- ``<prefix>:held:{<user>}``: a sorted set of the user's open connections (one member per
  socket), each scored by when it may be forgotten (Unix ms).  Every instance re-scores its
  live sockets' members every third of the TTL and removes a member when its socket closes; a
  member of an instance that died without saying so is dropped once its score passes, so the
  count heals within one TTL.  The key itself expires a TTL after its last write.

The count and the check are one script, so two instances admitting the same user at once
cannot both take the last slot.  Times are the instances' clocks (a skew of a second or so
shortens or lengthens one TTL by that much).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Final

from roomcast.broker.base import Admission, UserQuota
from roomcast.broker.keys import Keys
from roomcast.broker.redis.connection import RedisConnection, chunks
from roomcast.broker.redis.errors import REDIS_FAILURES, broker_error

__all__ = ["RedisUsers"]

ADMIT_LUA: Final = """
local per_window = tonumber(ARGV[1])
if per_window > 0 then
  local count = redis.call('INCR', KEYS[1])
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    left = tonumber(ARGV[2])
  end
  if count > per_window then return {1, left} end
end
local concurrent = tonumber(ARGV[3])
if concurrent > 0 then
  local now = tonumber(ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if not redis.call('ZSCORE', KEYS[2], ARGV[4]) and redis.call('ZCARD', KEYS[2]) >= concurrent then
    return {2, 0}
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {0, 0}
"""

_REFUSED: Final = {1: "user_connect_rate", 2: "user_connections"}
_BATCH: Final = 500


class RedisUsers:
    """Admits, keeps and releases users' connections; every Redis failure is a BrokerError."""

    def __init__(self, connection: RedisConnection, keys: Keys) -> None:
        self._connection = connection
        self._keys = keys
        self._script: Any = None

    async def admit(self, user: str, member: str, quota: UserQuota) -> Admission:
        keys = [self._keys.user_connects(user), self._keys.user_held(user)]
        args = [
            quota.per_window,
            quota.window_ms,
            quota.concurrent,
            member,
            quota.ttl_ms,
            int(time.time() * 1000),
        ]
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                if self._script is None:
                    self._script = client.register_script(ADMIT_LUA)
                refused, retry_after_ms = await self._script(keys=keys, args=args, client=client)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        limit = _REFUSED.get(int(refused))
        return Admission() if limit is None else Admission(limit, max(0, int(retry_after_ms)))

    async def release(self, held: list[tuple[str, str]]) -> None:
        for batch in chunks(held, _BATCH):
            try:
                async with self._connection.deadline():
                    client = await self._connection.ensure()
                    pipe = client.pipeline(transaction=False)
                    for user, member in batch:
                        pipe.zrem(self._keys.user_held(user), member)
                    await pipe.execute()
            except REDIS_FAILURES as exc:
                raise broker_error(exc) from exc

    async def keep(self, held: list[tuple[str, str]], ttl_ms: int) -> None:
        by_user: dict[str, dict[str, int]] = defaultdict(dict)
        until = int(time.time() * 1000) + ttl_ms
        for user, member in held:
            by_user[user][member] = until
        for batch in chunks(list(by_user.items()), _BATCH):
            try:
                async with self._connection.deadline():
                    client = await self._connection.ensure()
                    pipe = client.pipeline(transaction=False)
                    for user, members in batch:
                        key = self._keys.user_held(user)
                        pipe.zadd(key, members)
                        pipe.pexpire(key, ttl_ms)
                    await pipe.execute()
            except REDIS_FAILURES as exc:
                raise broker_error(exc) from exc
