"""Control messages between instances on one Redis, and the registry of live instances.

Every started instance subscribes two pub/sub channels: ``<prefix>:control`` (messages to every
instance) and ``<prefix>:control:<instance id>`` (messages to it alone), and says it is alive
in the sorted set ``<prefix>:instances`` (score: the time it last said so) every ping interval.
An instance counts as live for three ping intervals after it last said so.  Pub/sub is
at-most-once: an instance that is disconnected from Redis misses what was sent meanwhile, and
the server API reports it as an instance that did not answer.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Final

from roomcast.broker.base import ControlHandler
from roomcast.broker.keys import Keys
from roomcast.broker.redis.connection import RedisConnection, text
from roomcast.broker.redis.errors import REDIS_FAILURES, UNAVAILABLE_ERRORS, broker_error

__all__ = ["Control"]

logger = logging.getLogger("roomcast.broker")


# The registry is scored with Redis's clock, so an instance whose own clock is off is still
# counted live (or dead) correctly.  KEYS[1]: the registry.
# ANNOUNCE: ARGV[1] instance id, ARGV[2] ms after which a member is removed.
_ANNOUNCE_LUA: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return now
"""
# LIVE: ARGV[1] ms for which an announcement counts.
_LIVE_LUA: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


class Control:
    """The control channels of one instance, and the instance registry."""

    def __init__(
        self,
        connection: RedisConnection,
        keys: Keys,
        *,
        instance_id: str,
        ping_interval: float,
        errors: collections.Counter[str],
    ) -> None:
        self._errors = errors
        self._connection = connection
        self._keys = keys
        self._instance_id = instance_id
        self._live_ms = int(ping_interval * 3 * 1000)
        self.handler: ControlHandler | None = None
        self.channels = (keys.control().encode(), keys.control(instance_id).encode())
        """The channels this instance subscribes (when it has a handler)."""

    def on_message(self, channel: bytes, payload: object) -> bool:
        """Hand a control message to the handler; False if ``channel`` is not a control one."""
        if channel not in self.channels:
            return False
        handler = self.handler
        if handler is not None and isinstance(payload, bytes):
            handler(payload)
        return True

    async def send(self, message: bytes, instance: str | None) -> None:
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                await client.publish(self._keys.control(instance), message)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def announce(self) -> None:
        """Say this instance is alive, and forget instances silent for too long.  Best
        effort: a Redis that refuses the write (out of memory, a read-only replica) costs the
        server API this instance's answers being waited for, never the delivery of rooms."""
        if self.handler is None:
            return
        try:
            client = await self._connection.ensure()
            await client.eval(
                _ANNOUNCE_LUA, 1, self._keys.instances(), self._instance_id, self._live_ms * 10
            )
        except UNAVAILABLE_ERRORS:
            raise  # the link is down: the epoch ends, as for any command
        except REDIS_FAILURES as exc:
            self._errors["announce_failed"] += 1
            logger.warning("could not announce instance %s: %s", self._instance_id, exc)

    async def withdraw(self) -> None:
        """This instance stops: it is no longer live (best effort; else it ages out)."""
        if self.handler is None or self._connection.client is None:
            return
        try:
            async with self._connection.deadline():
                await self._connection.client.zrem(self._keys.instances(), self._instance_id)
        except REDIS_FAILURES as exc:
            logger.info("could not withdraw instance %s: %s", self._instance_id, exc)

    async def revoke(self, entry: str, until_ms: int) -> None:
        """Add a revocation entry, kept until ``until_ms`` (the later of two wins)."""
        key = self._keys.revocations()
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                pipe = client.pipeline(transaction=False)
                pipe.zadd(key, {entry: until_ms}, gt=True)  # adds, or keeps the later time
                pipe.zremrangebyscore(key, "-inf", int(time.time() * 1000))
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def revocations(self) -> list[str]:
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                now_ms = int(time.time() * 1000)
                entries: list[Any] = await client.zrangebyscore(
                    self._keys.revocations(), now_ms, "+inf"
                )
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        return [text(entry) for entry in entries]

    async def instances(self) -> list[str]:
        try:
            async with self._connection.deadline():
                client = await self._connection.ensure()
                members: list[Any] = await client.eval(
                    _LIVE_LUA, 1, self._keys.instances(), self._live_ms
                )
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        return sorted(text(member) for member in members)
