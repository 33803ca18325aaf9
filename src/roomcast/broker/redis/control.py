"""Control messages between instances on one Redis, and the registry of live instances.

Every started instance subscribes two pub/sub channels: ``<prefix>:control`` (messages to every
instance) and ``<prefix>:control:<instance id>`` (messages to it alone), and says it is alive
in the sorted set ``<prefix>:instances`` (score: the time it last said so) every ping interval.
An instance counts as live for three ping intervals after it last said so.  Pub/sub is
at-most-once: an instance that is disconnected from Redis misses what was sent meanwhile, and
the server API reports it as an instance that did not answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from roomcast.broker.base import ControlHandler
from roomcast.broker.keys import Keys
from roomcast.broker.redis.connection import RedisConnection, text
from roomcast.broker.redis.errors import REDIS_FAILURES, broker_error

__all__ = ["Control"]

logger = logging.getLogger("roomcast.broker")


class Control:
    """The control channels of one instance, and the instance registry."""

    def __init__(
        self, connection: RedisConnection, keys: Keys, *, instance_id: str, ping_interval: float
    ) -> None:
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
        """Say this instance is alive, and forget instances silent for too long."""
        if self.handler is None:
            return
        client = await self._connection.ensure()
        now_ms = int(time.time() * 1000)
        pipe = client.pipeline(transaction=False)
        pipe.zadd(self._keys.instances(), {self._instance_id: now_ms})
        pipe.zremrangebyscore(self._keys.instances(), "-inf", now_ms - self._live_ms * 10)
        await pipe.execute()

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
                since = int(time.time() * 1000) - self._live_ms
                members: list[Any] = await client.zrangebyscore(
                    self._keys.instances(), since, "+inf"
                )
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        return sorted(text(member) for member in members)
