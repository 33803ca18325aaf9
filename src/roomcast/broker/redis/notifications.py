"""Keyspace notifications for streams: enabled where allowed, verified where not.

The broker learns of new entries through keyspace notifications, which Redis sends only when
``notify-keyspace-events`` includes ``K`` and ``t``.  The broker merges those flags in with
``CONFIG SET``; where ``CONFIG`` is refused (managed Redis services), it probes each node with a
key of its own until a notification arrives, and stays not ready meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from roomcast.broker.base import BrokerError
from roomcast.broker.keys import Keys, keyspace_channel
from roomcast.broker.redis.connection import Client, RedisConnection, on_node, text

__all__ = ["Notifications", "missing_notify_flags"]

logger = logging.getLogger("roomcast.broker")


@dataclass(slots=True, eq=False)
class _Probe:
    subscribed: asyncio.Future[None]
    notified: asyncio.Future[None]


def missing_notify_flags(current: str) -> str:
    """The ``notify-keyspace-events`` flags to add so stream commands reach keyspace channels."""
    missing = "" if "K" in current else "K"
    if "t" not in current and "A" not in current:
        missing += "t"
    return missing


class Notifications:
    """Whether keyspace notifications for streams reach this instance (:attr:`ok`)."""

    def __init__(
        self, connection: RedisConnection, keys: Keys, *, instance_id: str, ping_interval: float
    ) -> None:
        self._connection = connection
        self._keys = keys
        self._instance_id = instance_id
        self._ping_interval = ping_interval
        self._probes: dict[bytes, _Probe] = {}
        self.config_refused = False
        """``CONFIG`` was refused on some node: :meth:`check` must verify notifications."""
        self.ok = False
        self.not_ready_reason: str | None = "not started"

    async def enable(self, client: Client) -> None:
        """Merge ``Kt`` into ``notify-keyspace-events`` on every primary, if allowed."""
        nodes: Sequence[ClusterNode | None] = (
            client.get_primaries() if isinstance(client, RedisCluster) else [None]
        )
        self.config_refused = False
        for node in nodes:
            where = "redis" if node is None else node.name
            try:
                current = await on_node(client, node, "CONFIG GET", "notify-keyspace-events")
                value = text(dict(current).get("notify-keyspace-events", ""))
                missing = missing_notify_flags(value)
                if missing:
                    await on_node(
                        client, node, "CONFIG SET", "notify-keyspace-events", value + missing
                    )
                    logger.info(
                        "enabled keyspace notifications on %s: notify-keyspace-events=%r",
                        where,
                        value + missing,
                    )
            except ResponseError as exc:
                self.config_refused = True
                self.ok = False
                self.not_ready_reason = (
                    f"CONFIG refused on {where} ({exc}); checking whether keyspace "
                    "notifications for streams are on"
                )
                logger.error(
                    "cannot read or set notify-keyspace-events on %s: %s. The operator must "
                    "enable keyspace notifications for streams (notify-keyspace-events must "
                    "include 'K' and 't', e.g. 'Kt'); checking whether they already are",
                    where,
                    exc,
                )
                return
        self.ok = True
        self.not_ready_reason = None

    async def check(
        self, listeners: dict[str, AbstractConnection], on_verified: Callable[[], None]
    ) -> None:
        """CONFIG was refused: probe each node until notifications are seen, then call
        ``on_verified`` (the broker catches up on every room)."""
        client = await self._connection.ensure()
        while True:
            failed = [
                name
                for name, conn in list(listeners.items())
                if not await self._probe(client, name, conn)
            ]
            if not failed:
                self.ok = True
                self.not_ready_reason = None
                logger.info("keyspace notifications for streams verified; broker ready")
                on_verified()
                return
            self.ok = False
            self.not_ready_reason = (
                f"keyspace notifications for streams are off on {', '.join(failed)}: the "
                "operator must set notify-keyspace-events to include 'Kt'"
            )
            logger.error("redis broker not ready: %s", self.not_ready_reason)
            await asyncio.sleep(max(self._ping_interval * 6, 1.0))

    def on_message(self, kind: object, channel: bytes, payload: object) -> None:
        """A pub/sub message of no room: a probe's subscription or notification, if any."""
        probe = self._probes.get(channel)
        if probe is None:
            return
        if kind == b"subscribe" and not probe.subscribed.done():
            probe.subscribed.set_result(None)
        elif kind == b"message" and payload == b"xadd" and not probe.notified.done():
            probe.notified.set_result(None)

    def cancel_probes(self) -> None:
        """The pub/sub connections closed: no probe can complete."""
        for probe in self._probes.values():
            for future in (probe.subscribed, probe.notified):
                if not future.done():
                    future.cancel()

    async def _probe(self, client: Client, name: str, conn: AbstractConnection) -> bool:
        key = self._keys.probe(self._probe_tag(name))
        channel = keyspace_channel(self._connection.db, key).encode()
        loop = asyncio.get_running_loop()
        probe = _Probe(loop.create_future(), loop.create_future())
        self._probes[channel] = probe
        try:
            await conn.send_command("SUBSCRIBE", channel, check_health=False)
            async with asyncio.timeout(2.0):
                await probe.subscribed
                pipe = client.pipeline(transaction=False)
                pipe.xadd(key, {"probe": self._instance_id}, maxlen=1, approximate=False)
                pipe.pexpire(key, 60_000)
                await pipe.execute()
                await probe.notified
        except TimeoutError:
            return False
        finally:
            self._probes.pop(channel, None)
            if conn.is_connected:
                await conn.send_command("UNSUBSCRIBE", channel, check_health=False)
        return True

    def _probe_tag(self, node_name: str) -> str:
        if not self._connection.is_cluster:
            return self._instance_id
        for attempt in range(100_000):
            tag = f"{self._instance_id}-{attempt}"
            if self._connection.node_name(self._keys.probe(tag)) == node_name:
                return tag
        raise BrokerError(f"no probe key maps to node {node_name}")
