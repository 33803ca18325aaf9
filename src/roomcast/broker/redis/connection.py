"""The Redis broker's command client: created on first use, single server or cluster.

It knows what every other part of the broker asks of the connection: the client (connecting
and checking the server's version the first time), the deadline of one operation, whether the
server is a cluster and which node serves a key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from roomcast.broker.base import BrokerError
from roomcast.broker.redis.errors import (
    REDIS_FAILURES,
    UNAVAILABLE_ERRORS,
    broker_error,
    unavailable,
)
from roomcast.broker.redis.publish import PUBLISH_LUA, packing

__all__ = [
    "SINGLE_NODE",
    "Client",
    "Entry",
    "RedisConnection",
    "Topology",
    "chunks",
    "field_map",
    "node_connection",
    "on_node",
    "text",
]

Client: TypeAlias = "aioredis.Redis | RedisCluster"
Entry: TypeAlias = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: its id and its fields."""

SINGLE_NODE: Final = "redis"
"""The node name of a single server (a cluster's nodes are named ``host:port``)."""

_MIN_REDIS_VERSION: Final = (7, 0)

Topology: TypeAlias = frozenset[tuple[int, int, str]]
"""A cluster's slot ranges and the primary that serves each."""


class RedisConnection:
    """The broker's command client and what is known of the server behind it."""

    def __init__(self, url: str, *, cluster: bool | None, socket_timeout: float) -> None:
        self._url = url
        self._cluster_option = cluster
        self.socket_timeout = socket_timeout
        self._client: Client | None = None
        self._is_cluster = False
        # Keyspace channels name the database; known from the URL before any connection, so
        # rooms subscribed before the first connection get the right channel.  A cluster only
        # has db 0.
        self.db = int(parse_url(url).get("db", 0) or 0)
        self.script: Any = None
        """The publish script, registered on the client (a cluster runs it through this)."""
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> Client | None:
        """The client if connected once, else ``None`` (nothing connects on reading this)."""
        return self._client

    @property
    def is_cluster(self) -> bool:
        return self._is_cluster

    async def ensure(self) -> Client:
        """The command client, created on first use (publishers need no broker start)."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = await self._connect()
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def deadline(self, *, epoch: bool = False) -> asyncio.Timeout:
        """The time limit of one operation (of connecting a whole epoch, with ``epoch``)."""
        return asyncio.timeout(self.socket_timeout * (4 if epoch else 1))

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The broker's loop, looked up once: on Python 3.11 every ``get_running_loop()`` is a
        ``getpid()`` system call, several per publish otherwise."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def node_name(self, key: str) -> str:
        """The name of the node that serves ``key``."""
        if isinstance(self._client, RedisCluster):
            node = self._client.get_node_from_key(key)
            if node is None:
                raise SlotNotCoveredError(f"no node serves key {key!r}")
            return str(node.name)
        return SINGLE_NODE

    async def read_topology(self, client: RedisCluster) -> Topology:
        slots = await client.execute_command("CLUSTER SLOTS", target_nodes=client.get_random_node())
        topology: set[tuple[int, int, str]] = set()
        for (start, end), owners in dict(slots).items():
            host, port = owners["primary"][:2]
            topology.add((int(start), int(end), f"{text(host)}:{int(port)}"))
        return frozenset(topology)

    def _client_options(self) -> dict[str, Any]:
        # No automatic retries: a retried XADD whose reply was lost would publish twice.
        # No socket_timeout (redis-py 8 defaults to 5 s): it is enforced on writes with
        # asyncio.wait_for, which on Python 3.11 can swallow a cancellation (stop() then
        # hangs). Every operation runs under deadline() instead, and redis-py drops a
        # connection interrupted mid-command, so no reply is ever read by the wrong caller.
        return {
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": None,
            "socket_connect_timeout": self.socket_timeout,
            "socket_keepalive": True,
            "protocol": 2,
        }

    async def _connect(self) -> Client:
        options = self._client_options()
        is_cluster = self._cluster_option
        client: Client
        if is_cluster is None:
            probe = aioredis.Redis.from_url(self._url, **options)
            try:
                async with self.deadline():
                    info = await probe.info("cluster")
            except REDIS_FAILURES as exc:
                raise broker_error(exc) from exc
            finally:
                await probe.aclose()
            is_cluster = int(info.get("cluster_enabled", 0)) == 1
        if is_cluster:
            client = RedisCluster.from_url(self._url, **options)
        else:
            # A blocking pool: a burst of commands (thousands of sockets saving their recovery
            # state at once) waits for a connection instead of failing "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url, max_connections=64, timeout=None, **options
            )
            pool.connection_class = packing(pool.connection_class)
            client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        try:
            async with self.deadline(epoch=True):
                versions = await _server_versions(client)
        except (*UNAVAILABLE_ERRORS, RedisClusterException) as exc:
            await client.aclose()
            raise unavailable(exc) from exc
        for version in versions:
            major_minor = tuple(int(part) for part in str(version).split(".")[:2])
            if major_minor < _MIN_REDIS_VERSION:
                await client.aclose()
                raise BrokerError(f"redis {version} is too old: roomcast needs redis 7.0 or newer")
        self._is_cluster = isinstance(client, RedisCluster)
        if self._is_cluster and self.db != 0:
            await client.aclose()
            raise BrokerError(f"redis cluster has only database 0, the url names {self.db}")
        self.script = client.register_script(PUBLISH_LUA)
        return client


async def _server_versions(client: Client) -> list[str]:
    """The version of every primary."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        return [
            (await client.info("server", target_nodes=node))["redis_version"]
            for node in client.get_primaries()
        ]
    return [(await client.info("server"))["redis_version"]]


async def on_node(client: Client, node: ClusterNode | None, *args: str) -> Any:
    """Run a command on ``node`` of a cluster, or on the single server (``node`` is ``None``)."""
    if node is None:
        return await client.execute_command(*args)
    return await client.execute_command(*args, target_nodes=node)


def node_connection(node: ClusterNode) -> AbstractConnection:
    """A new connection to a cluster node, outside its pool (for pub/sub)."""
    options = dict(node.connection_kwargs)
    return node.connection_class(**options)


def field_map(fields: list[bytes]) -> dict[bytes, bytes]:
    """A raw stream entry's ``[field, value, ...]`` as a dict."""
    it = iter(fields)
    return dict(zip(it, it, strict=True))


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for index in range(0, len(items), size):
        yield list(items[index : index + size])
