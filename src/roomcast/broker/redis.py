"""The Redis broker: one Redis Stream per room, woken by keyspace notifications.

Publishing is a plain ``XADD`` of an envelope (see :mod:`roomcast.broker.envelope`) to the room's
stream, so services in any language can publish.  An instance receives only the rooms it has
local members for: it subscribes to the keyspace-notification channel of each such room's
stream, and on ``xadd`` reads the new entries (``XREAD``) after the last entry it delivered.
Because delivery always resumes from that id, an outage or a missed notification costs latency,
never an entry, and nothing is delivered twice.  ``docs/redis.md`` explains the design.

Tasks (one set per connection "epoch", restarted with capped exponential backoff):

* one reader per pub/sub connection (one per cluster primary): notifications -> dirty rooms;
* one processor: fetches every dirty room at most once per wake-up, and delivers;
* one publishing lane (started by the first publish): batches publish scripts on its own
  connection;
* one watcher: pings the pub/sub connections and, on a cluster, notices slot moves;
* when ``CONFIG`` is refused: a checker that verifies notifications arrive at all.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast.auth import validate_room
from roomcast.broker.base import (
    BatchScope,
    BrokerError,
    BrokerState,
    BrokerUnavailableError,
    DeliveryHandler,
    History,
    Publication,
    PublishRequest,
    PublishResult,
)
from roomcast.broker.envelope import (
    EnvelopeError,
    decode_envelope,
    decode_feed,
    encode_envelope,
    encode_feed,
)
from roomcast.broker.keys import Keys, keyspace_channel
from roomcast.broker.offsets import OffsetError, parse_offset
from roomcast.broker.redis_errors import (
    REDIS_FAILURES,
    UNAVAILABLE_ERRORS,
    broker_error,
    unavailable,
)
from roomcast.broker.redis_publish import (
    PUBLISH_LUA,
    PublishLane,
    is_stale,
    pack_command,
    packing,
)

__all__ = ["RedisBroker"]

logger = logging.getLogger("roomcast.broker")

_Client: TypeAlias = "aioredis.Redis | RedisCluster"
_Entry: TypeAlias = tuple[bytes, dict[bytes, bytes]]

_MIN_REDIS_VERSION: Final = (7, 0)
_SINGLE_NODE: Final = "redis"
_SUBSCRIBE_CHUNK: Final = 500
_FETCH_CHUNK: Final = 256


# KEYS[1]: the room's stream; KEYS[2] (optional): the idempotency record.
# ARGV: maxlen, stream ttl ms, idempotency window ms, publication id, feed channel (or ""),
# feed body, field, value, ...
# Returns {1, entry id} after appending, or {0, "<id>|<entry id>"} of the original publication.
# With a feed channel, the entry is also published there as "<previous entry id> <entry id>
# <body>"; the previous id is "0-0" when the stream is empty or gone.
class _TopologyChangedError(RedisError):
    """The cluster's slot map changed: subscriptions must be made again on the new owners."""


@dataclass(slots=True, eq=False)
class _Room:
    """A subscribed room.  A new object per subscription, so late results can be told apart."""

    name: str
    key: str
    channel: bytes
    """The keyspace-notification channel of the room's stream."""
    feed: bytes
    """The room's feed channel (subscribed on a single server only)."""
    last_id: str | None = None
    """The last entry delivered (or skipped); ``None`` until initialised from Redis."""


@dataclass(slots=True, eq=False)
class _Probe:
    subscribed: asyncio.Future[None]
    notified: asyncio.Future[None]


@dataclass(slots=True)
class _Fetched:
    room: _Room
    entries: list[_Entry]


def _field_map(fields: list[bytes]) -> dict[bytes, bytes]:
    """A raw stream entry's ``[field, value, ...]`` as a dict."""
    it = iter(fields)
    return dict(zip(it, it, strict=True))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _missing_notify_flags(current: str) -> str:
    """The ``notify-keyspace-events`` flags to add so stream commands reach keyspace channels."""
    missing = "" if "K" in current else "K"
    if "t" not in current and "A" not in current:
        missing += "t"
    return missing


class RedisBroker:
    """A :class:`~roomcast.broker.base.Broker` on Redis (single server or Redis Cluster).

    Counters (plain attributes, read by metrics): ``dropped`` counts entries not delivered by
    reason, ``delivered`` the entries handed to the handler, ``reconnects`` the connection
    epochs after the first, ``errors`` failures that dropped no entry.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "roomcast",
        history_size: int = 1000,
        history_ttl_ms: int = 120_000,
        idempotency_window_ms: int = 300_000,
        upstream_stream: str | None = None,
        cluster: bool | None = None,
        upstream_maxlen: int | None = 1_000_000,
        socket_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        ping_interval: float = 5.0,
        fetch_count: int = 1000,
    ) -> None:
        for name, value in (
            ("history_size", history_size),
            ("history_ttl_ms", history_ttl_ms),
            ("idempotency_window_ms", idempotency_window_ms),
            ("fetch_count", fetch_count),
        ):
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, got {value}")
        if upstream_maxlen is not None and upstream_maxlen < 1:
            raise ValueError(f"upstream_maxlen: must be at least 1 or None, got {upstream_maxlen}")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(
                f"backoff_initial: must be > 0 and <= backoff_max, got {backoff_initial}"
            )
        self._url = url
        self._keys = Keys(prefix, upstream=upstream_stream)
        self._history_size = history_size
        self._history_ttl_ms = history_ttl_ms
        self._idempotency_window_ms = idempotency_window_ms
        self._cluster_option = cluster
        self._upstream_maxlen = upstream_maxlen
        self._socket_timeout = socket_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._ping_interval = ping_interval
        self._fetch_count = fetch_count

        self.instance_id = uuid.uuid4().hex[:16]
        self.dropped: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.delivered = 0
        self.fed = 0
        """Entries delivered from feed messages, without reading the stream."""
        self.reconnects = 0

        self._state = BrokerState.STOPPED
        self._handler: DeliveryHandler | None = None
        self._batch: BatchScope | None = None
        self._stopped = False
        """After :meth:`stop`: publishing is refused, so nothing reopens a connection."""
        self._client: _Client | None = None
        self._is_cluster = False
        self._lane = PublishLane(self._ensure_client, self._deadline, self._running_loop)
        self._fetch_conn: AbstractConnection | None = None
        """Single node: the processor's own connection for ``XREAD`` (no pool checkout)."""
        self._last_heard: dict[str, float] = {}
        """Per pub/sub connection, when it last delivered anything (a PONG at least)."""
        # Keyspace channels name the database; known from the URL before any connection, so
        # rooms subscribed before start() get the right channel.  A cluster only has db 0.
        self._db = int(parse_url(url).get("db", 0) or 0)
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None

        self._rooms: dict[str, _Room] = {}
        self._channels: dict[bytes, _Room] = {}
        self._dirty: set[str] = set()
        self._fetching = False
        """The processor is reading rooms: feed messages wait for it (entry order)."""
        self._fed: list[tuple[tuple[int, int], _Room, Publication]] = []
        """Entries taken from feed messages in the current burst, delivered at its end."""
        self._wake = asyncio.Event()
        self._wake_due = False
        """A wake-up of the processor is scheduled for the end of the current callback."""
        self._listeners: dict[str, AbstractConnection] = {}
        self._probes: dict[bytes, _Probe] = {}
        self._topology: frozenset[tuple[int, int, str]] = frozenset()
        self._config_refused = False
        self._notifications_ok = False
        self._not_ready_reason: str | None = "not started"

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def ready(self) -> bool:
        """Connected, and keyspace notifications for streams are known to reach this instance."""
        return self._state is BrokerState.CONNECTED and self._notifications_ok

    @property
    def not_ready_reason(self) -> str | None:
        """Why :attr:`ready` is false, for health checks and logs."""
        if self._state is not BrokerState.CONNECTED:
            return f"redis broker {self._state.value}"
        return None if self._notifications_ok else self._not_ready_reason

    @property
    def is_cluster(self) -> bool:
        return self._is_cluster

    @property
    def subscribed_rooms(self) -> frozenset[str]:
        return frozenset(self._rooms)

    async def start(self, handler: DeliveryHandler, *, batch: BatchScope | None = None) -> None:
        """Connect, enable notifications, subscribe, and deliver in a background task.

        Raise :class:`BrokerUnavailableError` if Redis cannot be reached at all; later outages
        are survived by reconnecting.
        """
        if self._supervisor is not None:
            raise BrokerError("redis broker already started")
        self._handler = handler
        self._batch = batch
        self._stopped = False
        self._state = BrokerState.STARTING
        try:
            async with self._deadline(epoch=True):
                await self._ensure_client()
                await self._open_epoch()
        except UNAVAILABLE_ERRORS as exc:
            await self._close_listeners()
            self._state = BrokerState.STOPPED
            raise unavailable(exc) from exc
        except BaseException:
            await self._close_listeners()
            self._state = BrokerState.STOPPED
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="roomcast-redis-broker")

    async def stop(self) -> None:
        self._stopped = True
        supervisor, self._supervisor = self._supervisor, None
        self._state = BrokerState.STOPPED
        if supervisor is not None:
            supervisor.cancel()
            done, _ = await asyncio.wait([supervisor], timeout=self._socket_timeout * 2)
            if not done:
                self.errors["stop_timeout"] += 1
                logger.error(
                    "redis broker tasks did not stop within %.1fs", self._socket_timeout * 2
                )
        await self._lane.close(self._socket_timeout)
        await self._close_listeners()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self._handler = None

    async def publish(self, request: PublishRequest) -> PublishResult:
        if self._stopped:
            raise BrokerUnavailableError("redis broker stopped")
        validate_room(request.room)
        publication = Publication(
            room=request.room,
            event=request.event,
            data=request.data,
            id=uuid.uuid4().hex,
            idempotency_key=request.idempotency_key,
            traceparent=request.traceparent,
            published_at_ms=int(time.time() * 1000),
            exclude_sid=request.exclude_sid,
            origin=self.instance_id,
        )
        fields = encode_envelope(publication)
        keys = [self._keys.room(request.room)]
        if request.idempotency_key is not None:
            keys.append(self._keys.idempotency(request.room, request.idempotency_key))
        try:
            if self._client is None:  # connect first: only then is it known to be a cluster
                async with self._deadline():
                    await self._ensure_client()
            feed = (
                ("", "")  # a cluster would broadcast the message to every node
                if self._is_cluster
                else (self._keys.feed(request.room, self._db), encode_feed(fields))
            )
            args: list[str | int] = [
                self._history_size,
                self._history_ttl_ms,
                self._idempotency_window_ms,
                publication.id,
                *feed,
            ]
            for name, value in fields.items():
                args += (name, value)
            if self._is_cluster:
                async with self._deadline():
                    client = await self._ensure_client()
                    appended, value = await self._script(keys=keys, args=args, client=client)
            else:  # the batch carries the deadline: one timer per batch, not per publish
                appended, value = await self._lane.submit(keys, args)
        except REDIS_FAILURES as exc:
            # On a timeout the script may still have run: a retry needs the idempotency key.
            raise broker_error(exc) from exc
        if appended == 1:
            return PublishResult(id=publication.id, offset=_text(value))
        original_id, _, offset = _text(value).partition("|")
        return PublishResult(id=original_id, offset=offset, duplicate=True)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The broker's loop, looked up once: on Python 3.11 every ``get_running_loop()`` is a
        ``getpid()`` system call, several per publish otherwise."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def subscribe(self, room: str) -> None:
        """Deliver ``room``'s entries newer than its stream's last entry right now.

        If Redis is unreachable, the room is still registered: the reconnect subscribes it and
        starts from the stream's last entry at that time.
        """
        validate_room(room)
        if room in self._rooms:
            return
        key = self._keys.room(room)
        channel = keyspace_channel(self._db, key).encode()
        state = _Room(room, key, channel, self._keys.feed(room, self._db).encode())
        self._rooms[room] = state
        self._channels[state.channel] = state
        self._channels[state.feed] = state
        if self._state is BrokerState.STOPPED or self._client is None:
            return
        try:
            async with self._deadline():
                last_id = await self._last_entry_id(self._client, key)
                if state.last_id is None:
                    state.last_id = last_id
                if self._rooms.get(room) is state:
                    await self._send_to_listener(key, "SUBSCRIBE", *self._subscription(state))
        except REDIS_FAILURES as exc:
            error = broker_error(exc)
            if isinstance(error, BrokerUnavailableError):
                logger.warning(
                    "subscribe %r: redis unavailable (%s); it is subscribed on reconnect", room, exc
                )
                return
            # Redis refuses the room itself (its key is not a stream): no reconnect mends that.
            if self._rooms.get(room) is state:
                del self._rooms[room]
                self._channels.pop(state.channel, None)
                self._channels.pop(state.feed, None)
            self.errors["subscribe_failed"] += 1
            raise error from exc

    async def unsubscribe(self, room: str) -> None:
        state = self._rooms.pop(room, None)
        if state is None:
            return
        self._channels.pop(state.channel, None)
        self._channels.pop(state.feed, None)
        self._dirty.discard(room)
        try:
            async with self._deadline():
                await self._send_to_listener(state.key, "UNSUBSCRIBE", *self._subscription(state))
        except UNAVAILABLE_ERRORS as exc:
            # The connection is gone, and with it the subscription; reconnecting skips the room.
            logger.debug("unsubscribe %r: redis unavailable (%s)", room, exc)

    async def history(self, room: str, after_offset: str) -> History:
        """Entries of ``room`` after ``after_offset``; ``complete`` is false if any may be gone.

        See :func:`_history_complete` for how trimming, deletion and expiry are detected.
        """
        validate_room(room)
        after = parse_offset(after_offset)
        key = self._keys.room(room)
        start = "-" if after == (0, 0) else f"({after[0]}-{after[1]}"
        try:
            async with self._deadline():
                client = await self._ensure_client()
                pipe = client.pipeline(transaction=False)
                pipe.xrange(key, start, "+")
                pipe.xinfo_stream(key)
                entries, info = await pipe.execute(raise_on_error=False)
                if isinstance(entries, Exception):
                    raise entries
                publications = await self._decode_and_filter(client, room, entries, claim=False)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        complete = _history_complete(after, info, int(time.time() * 1000), self._history_ttl_ms)
        return History(publications=publications, complete=complete)

    async def save_session(self, pid: str, state: bytes, ttl_ms: int) -> None:
        key = self._keys.session(pid)
        try:
            async with self._deadline():
                client = await self._ensure_client()
                await client.set(key, state, px=max(1, ttl_ms))
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def write_sessions(self, items: list[tuple[str, bytes | None, int]]) -> None:
        if not items:
            return
        try:
            async with self._deadline():
                client = await self._ensure_client()
                pipe = client.pipeline(transaction=False)
                for pid, state, ttl_ms in items:
                    if state is None:
                        pipe.delete(self._keys.session(pid))
                    else:
                        pipe.set(self._keys.session(pid), state, px=max(1, ttl_ms))
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def take_session(self, pid: str) -> bytes | None:
        key = self._keys.session(pid)
        try:
            async with self._deadline():
                client = await self._ensure_client()
                value = await client.getdel(key)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        if value is None or isinstance(value, bytes):
            return value
        return str(value).encode()

    async def touch_sessions(self, pids: list[str], ttl_ms: int) -> None:
        if not pids:
            return
        try:
            async with self._deadline():
                client = await self._ensure_client()
                pipe = client.pipeline(transaction=False)
                for pid in pids:
                    pipe.pexpire(self._keys.session(pid), max(1, ttl_ms))
                await pipe.execute()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    async def append_upstream(self, fields: dict[str, str]) -> str:
        """``XADD <prefix>:upstream [MAXLEN ~ upstream_maxlen] * <fields>``; return the entry id."""
        if not fields:
            raise ValueError("fields: an upstream entry needs at least one field")
        try:
            async with self._deadline():
                client = await self._ensure_client()
                entry_id = await client.xadd(
                    self._keys.upstream(),
                    dict(fields),  # type: ignore[arg-type]
                    maxlen=self._upstream_maxlen,
                    approximate=True,
                )
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        return _text(entry_id)

    # ------------------------------------------------------------------ connection

    async def _ensure_client(self) -> _Client:
        """The command client, created on first use (publishers need no :meth:`start`)."""
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                self._client = await self._connect()
        return self._client

    def _client_options(self) -> dict[str, Any]:
        # No automatic retries: a retried XADD whose reply was lost would publish twice.
        # No socket_timeout (redis-py 8 defaults to 5 s): it is enforced on writes with
        # asyncio.wait_for, which on Python 3.11 can swallow a cancellation (stop() then
        # hangs). Every operation runs under _deadline() instead, and redis-py drops a
        # connection interrupted mid-command, so no reply is ever read by the wrong caller.
        return {
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": None,
            "socket_connect_timeout": self._socket_timeout,
            "socket_keepalive": True,
            "protocol": 2,
        }

    def _deadline(self, *, epoch: bool = False) -> asyncio.Timeout:
        """The time limit of one operation (of connecting a whole epoch, with ``epoch``)."""
        return asyncio.timeout(self._socket_timeout * (4 if epoch else 1))

    async def _connect(self) -> _Client:
        options = self._client_options()
        is_cluster = self._cluster_option
        client: _Client
        if is_cluster is None:
            probe = aioredis.Redis.from_url(self._url, **options)
            try:
                async with self._deadline():
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
            async with self._deadline(epoch=True):
                versions = await self._server_versions(client)
        except (*UNAVAILABLE_ERRORS, RedisClusterException) as exc:
            await client.aclose()
            raise unavailable(exc) from exc
        for version in versions:
            major_minor = tuple(int(part) for part in str(version).split(".")[:2])
            if major_minor < _MIN_REDIS_VERSION:
                await client.aclose()
                raise BrokerError(f"redis {version} is too old: roomcast needs redis 7.0 or newer")
        self._is_cluster = isinstance(client, RedisCluster)
        if self._is_cluster and self._db != 0:
            await client.aclose()
            raise BrokerError(f"redis cluster has only database 0, the url names {self._db}")
        self._script = client.register_script(PUBLISH_LUA)
        return client

    async def _server_versions(self, client: _Client) -> list[str]:
        """The version of every primary."""
        if isinstance(client, RedisCluster):
            await client.initialize()
            return [
                (await client.info("server", target_nodes=node))["redis_version"]
                for node in client.get_primaries()
            ]
        return [(await client.info("server"))["redis_version"]]

    async def _supervise(self) -> None:
        """Run epochs until stopped; reconnect with capped exponential backoff."""
        delay = self._backoff_initial
        opened = True  # start() opened the first epoch
        while True:
            if not opened:
                try:
                    async with self._deadline(epoch=True):
                        await self._open_epoch()
                except UNAVAILABLE_ERRORS as exc:
                    logger.warning("redis reconnect failed: %s; next try in %.1fs", exc, delay)
                    await self._close_listeners()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
                    continue
                except Exception:
                    # Task boundary: an unexpected failure is logged, counted and retried.
                    logger.exception("redis broker: unexpected error while connecting")
                    self.errors["unexpected"] += 1
                    await self._close_listeners()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
                    continue
                self.reconnects += 1
                logger.info("redis broker reconnected; catching up %d rooms", len(self._rooms))
            opened = False
            delay = self._backoff_initial
            try:
                await self._run_epoch()
            except Exception:
                logger.exception("redis broker: unexpected error; reconnecting")
                self.errors["unexpected"] += 1
            finally:
                self._state = (
                    BrokerState.STOPPED if self._supervisor is None else BrokerState.DISCONNECTED
                )
                await self._close_listeners()

    async def _open_epoch(self) -> None:
        """Enable notifications, open the pub/sub connections and subscribe every room."""
        client = await self._ensure_client()
        if isinstance(client, RedisCluster):
            await client.initialize()
            self._topology = await self._read_topology(client)
        await self._enable_notifications(client)
        await self._open_listeners(client)
        pending = [room for room in self._rooms.values() if room.last_id is None]
        if pending:
            await self._initialise_rooms(client, pending)
        by_node: dict[str, list[bytes]] = collections.defaultdict(list)
        for room in list(self._rooms.values()):
            by_node[self._node_name(room.key)].extend(self._subscription(room))
        for name, channels in by_node.items():
            conn = self._listeners.get(name)
            if conn is None:
                raise _TopologyChangedError(f"no pub/sub connection to node {name}")
            for chunk in _chunks(channels, _SUBSCRIBE_CHUNK):
                await conn.send_command("SUBSCRIBE", *chunk, check_health=False)
        self._state = BrokerState.CONNECTED

    async def _run_epoch(self) -> None:
        """Run the readers, the processor and the watcher until one fails."""
        try:
            async with asyncio.TaskGroup() as group:
                for name, conn in self._listeners.items():
                    group.create_task(self._read(name, conn), name=f"roomcast-redis-read-{name}")
                group.create_task(self._process(), name="roomcast-redis-process")
                group.create_task(self._watch(), name="roomcast-redis-watch")
                if self._config_refused:
                    group.create_task(self._check_notifications(), name="roomcast-redis-check")
        except* (*UNAVAILABLE_ERRORS, _TopologyChangedError) as group_error:
            first = group_error.exceptions[0]
            logger.warning(
                "redis connection lost (%s: %s); reconnecting", type(first).__name__, first
            )

    async def _open_listeners(self, client: _Client) -> None:
        nodes: list[tuple[str, AbstractConnection]] = []
        if isinstance(client, RedisCluster):
            for node in client.get_primaries():
                nodes.append((node.name, _node_connection(node)))
        else:
            nodes.append((_SINGLE_NODE, client.connection_pool.make_connection()))  # type: ignore[no-untyped-call]
            self._fetch_conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            await self._fetch_conn.connect()
        for name, conn in nodes:
            self._listeners[name] = conn
        for conn in self._listeners.values():
            await conn.connect()  # type: ignore[no-untyped-call]

    async def _close_listeners(self) -> None:
        listeners = list(self._listeners.values())
        self._listeners.clear()
        fetch_conn, self._fetch_conn = self._fetch_conn, None
        if fetch_conn is not None:
            listeners.append(fetch_conn)
        for conn in listeners:
            await conn.disconnect(nowait=True)
        for probe in self._probes.values():
            for future in (probe.subscribed, probe.notified):
                if not future.done():
                    future.cancel()

    def _node_name(self, key: str) -> str:
        if isinstance(self._client, RedisCluster):
            node = self._client.get_node_from_key(key)
            if node is None:
                raise SlotNotCoveredError(f"no node serves key {key!r}")
            return str(node.name)
        return _SINGLE_NODE

    def _subscription(self, room: _Room) -> tuple[bytes, ...]:
        """The channels to subscribe for ``room``: its keyspace channel, and on a single server
        its feed (a cluster would broadcast every feed message to all its nodes)."""
        return (room.channel,) if self._is_cluster else (room.channel, room.feed)

    async def _send_to_listener(self, key: str, *args: str | bytes) -> None:
        conn = self._listeners.get(self._node_name(key))
        # Never let a send reconnect a dropped connection behind the reader's back.
        if conn is not None and conn.is_connected:
            await conn.send_command(*args, check_health=False)

    # ------------------------------------------------------------------ notifications

    async def _enable_notifications(self, client: _Client) -> None:
        """Merge ``Kt`` into ``notify-keyspace-events`` on every primary, if allowed."""
        nodes: Sequence[ClusterNode | None] = (
            client.get_primaries() if isinstance(client, RedisCluster) else [None]
        )
        self._config_refused = False
        for node in nodes:
            where = "redis" if node is None else node.name
            try:
                current = await _on_node(client, node, "CONFIG GET", "notify-keyspace-events")
                value = _text(dict(current).get("notify-keyspace-events", ""))
                missing = _missing_notify_flags(value)
                if missing:
                    await _on_node(
                        client, node, "CONFIG SET", "notify-keyspace-events", value + missing
                    )
                    logger.info(
                        "enabled keyspace notifications on %s: notify-keyspace-events=%r",
                        where,
                        value + missing,
                    )
            except ResponseError as exc:
                self._config_refused = True
                self._notifications_ok = False
                self._not_ready_reason = (
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
        self._notifications_ok = True
        self._not_ready_reason = None

    async def _check_notifications(self) -> None:
        """CONFIG was refused: probe each node until notifications are seen, then catch up."""
        client = await self._ensure_client()
        while True:
            failed = [
                name
                for name, conn in list(self._listeners.items())
                if not await self._probe(client, name, conn)
            ]
            if not failed:
                self._notifications_ok = True
                self._not_ready_reason = None
                logger.info("keyspace notifications for streams verified; broker ready")
                self._mark_dirty(self._rooms.values())
                return
            self._notifications_ok = False
            self._not_ready_reason = (
                f"keyspace notifications for streams are off on {', '.join(failed)}: the "
                "operator must set notify-keyspace-events to include 'Kt'"
            )
            logger.error("redis broker not ready: %s", self._not_ready_reason)
            await asyncio.sleep(max(self._ping_interval * 6, 1.0))

    async def _probe(self, client: _Client, name: str, conn: AbstractConnection) -> bool:
        key = self._keys.probe(self._probe_tag(name))
        channel = keyspace_channel(self._db, key).encode()
        loop = asyncio.get_running_loop()
        probe = _Probe(loop.create_future(), loop.create_future())
        self._probes[channel] = probe
        try:
            await conn.send_command("SUBSCRIBE", channel, check_health=False)
            async with asyncio.timeout(2.0):
                await probe.subscribed
                pipe = client.pipeline(transaction=False)
                pipe.xadd(key, {"probe": self.instance_id}, maxlen=1, approximate=False)
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
        if not isinstance(self._client, RedisCluster):
            return self.instance_id
        for attempt in range(100_000):
            tag = f"{self.instance_id}-{attempt}"
            if self._node_name(self._keys.probe(tag)) == node_name:
                return tag
        raise BrokerError(f"no probe key maps to node {node_name}")

    # ------------------------------------------------------------------ epoch tasks

    async def _read(self, name: str, conn: AbstractConnection) -> None:
        """Turn notifications into dirty rooms, and feed messages into deliveries; the
        watcher's pings keep data flowing.

        No timeout per read (one would cost a timer per notification): the watcher notices a
        connection that stopped answering its pings and ends the epoch instead.

        A message that had to be waited for starts a burst: the reader sleeps the coalescing
        window before handling it, so the rest of the burst waits in the socket buffer and is
        handled in one go, instead of a task wake-up per message.  Messages already buffered
        are handled at once, in order: a feed message then always follows its entry's
        notification."""
        heard = self._last_heard
        heard[name] = time.monotonic()
        clock = time.monotonic
        while True:
            asked = clock()
            response = await conn.read_response(timeout=None)
            now = heard[name] = clock()
            if now - asked > _WAITED_SECONDS:
                await asyncio.sleep(_COALESCE_SECONDS)
            self._on_pubsub(response)

    def _on_pubsub(self, response: object) -> None:
        if not isinstance(response, list) or len(response) < 3:
            return  # a PONG outside subscribed mode
        kind, channel, payload = response[0], response[1], response[2]
        room = self._channels.get(channel)
        if room is None:
            probe = self._probes.get(channel)
            if probe is not None:
                if kind == b"subscribe" and not probe.subscribed.done():
                    probe.subscribed.set_result(None)
                elif kind == b"message" and payload == b"xadd" and not probe.notified.done():
                    probe.notified.set_result(None)
            return
        if kind == b"message":
            if channel == room.feed:
                self._on_feed(room, payload)
            elif payload == b"xadd":
                self._mark_dirty((room,))
        elif kind == b"subscribe" and channel == room.channel:
            # A confirmed subscription marks the room: its catch-up then runs strictly after
            # notifications flow, so an entry appended in between is never missed.
            self._mark_dirty((room,))

    def _on_feed(self, room: _Room, payload: bytes) -> None:
        """Take the entry a feed message carries, if it is the next one for ``room``.

        Only when the message names the room's last delivered entry as its predecessor (so
        nothing was appended in between, by anyone), no fetch is in flight, and no other room
        waits for one (an older entry of another room must not be overtaken).  Otherwise the
        entry's notification, which came just before, has marked the room, and the fetch
        reads it from the stream.  Taken entries are delivered when the reader has handled
        the burst it woke for, sorted by entry id across rooms, as a fetch delivers.
        """
        previous, _, rest = payload.partition(b" ")
        if (
            self._fetching
            or room.last_id is None
            or previous.decode("ascii", "replace") != room.last_id
            or len(self._dirty) > 1
            or (self._dirty and room.name not in self._dirty)
        ):
            self._mark_dirty((room,))
            return
        entry_id, _, body = rest.partition(b" ")
        try:
            publication = decode_feed(entry_id.decode("ascii"), body, room=room.name)
            position = parse_offset(publication.offset)
            if position <= parse_offset(room.last_id):
                raise OffsetError(f"entry {publication.offset} is not after {room.last_id}")
            if position[0] > time.time() * 1000 + CLOCK_MARGIN_MS:
                raise OffsetError(f"entry {publication.offset} is in the future")
        except (EnvelopeError, OffsetError, UnicodeDecodeError) as exc:
            # Not lost: the stream has the entry, and the fetch reads (or drops) it there.
            self.errors["bad_feed_message"] += 1
            logger.warning("bad feed message for room %r (%s); reading the stream", room.name, exc)
            self._mark_dirty((room,))
            return
        room.last_id = publication.offset
        self._dirty.discard(room.name)
        if not self._fed:
            self._running_loop().call_soon(self._deliver_fed)
        self._fed.append((position, room, publication))

    def _deliver_fed(self) -> None:
        """Deliver the entries taken from feed messages, in entry-id order across rooms."""
        fed, self._fed = self._fed, []
        fed.sort(key=lambda item: item[0])
        batch = self._batch if self._batch is not None and len(fed) > 1 else nullcontext
        with batch():
            for _, room, publication in fed:
                if self._rooms.get(room.name) is room:  # else unsubscribed meanwhile
                    self.fed += 1
                    self._deliver(publication)

    def _mark_dirty(self, rooms: Iterable[_Room]) -> None:
        """Mark rooms for the processor, which wakes once the current callback is done: a
        reader handles a whole burst in one callback, and the feed messages of the burst
        usually take back what its notifications marked, so the processor is not woken for
        nothing once per burst."""
        for room in rooms:
            self._dirty.add(room.name)
        if self._dirty and not self._wake_due:
            self._running_loop().call_soon(self._wake_processor)
            self._wake_due = True

    def _wake_processor(self) -> None:
        self._wake_due = False
        if self._dirty:
            self._wake.set()

    async def _process(self) -> None:
        """Fetch every dirty room once per wake-up and deliver in stream order."""
        client = await self._ensure_client()
        while True:
            await self._wake.wait()
            # No wait here: the readers already slept the coalescing window before handling
            # the burst that woke this task, and every notification of it is in.
            self._wake.clear()
            if not self._dirty:  # feed messages took what the notifications announced
                continue
            names, self._dirty = self._dirty, set()
            rooms = [self._rooms[name] for name in names if name in self._rooms]
            self._fetching = True
            try:
                for chunk in _chunks(rooms, _FETCH_CHUNK):
                    async with self._deadline(epoch=True):
                        await self._fetch_and_deliver(client, chunk)
            finally:
                self._fetching = False

    async def _fetch_and_deliver(self, client: _Client, rooms: list[_Room]) -> None:
        pending = [room for room in rooms if room.last_id is None]
        if pending:
            await self._initialise_rooms(client, pending)
        rooms = [room for room in rooms if room.last_id is not None]
        results = await self._read_rooms(client, rooms)
        fetched: list[_Fetched] = []
        for room, result in zip(rooms, results, strict=True):
            if isinstance(result, UNAVAILABLE_ERRORS):
                raise result
            if isinstance(result, Exception):
                self.errors["read_failed"] += 1
                logger.error("cannot read room %r from %s: %s", room.name, room.key, result)
                continue
            if len(result) >= self._fetch_count:
                self._mark_dirty((room,))  # more to read: next wake-up
            if result:
                fetched.append(_Fetched(room, result))
        if not fetched:
            return
        decoded = [
            (item.room, self._decode_entries(item.room.name, item.entries, reason_prefix=""))
            for item in fetched
        ]
        skip = await self._claim_idempotency_keys(
            client, [pub for _, pubs in decoded for _, pub in pubs if pub is not None]
        )
        # Deliver the whole batch in entry-id order across rooms, so that a socket in several
        # rooms receives them in offset order: its last offset then tells recovery what it has.
        merged = sorted(
            (
                (parse_offset(entry_id), room, entry_id, pub)
                for room, pubs in decoded
                for entry_id, pub in pubs
            ),
            key=lambda item: item[0],
        )
        batch = self._batch if self._batch is not None and len(merged) > 1 else nullcontext
        with batch():
            for _, room, entry_id, publication in merged:
                if self._rooms.get(room.name) is not room:
                    continue  # unsubscribed meanwhile
                room.last_id = entry_id
                if publication is None or publication.offset in skip:
                    continue
                self._deliver(publication)

    async def _read_rooms(self, client: _Client, rooms: list[_Room]) -> list[Any]:
        """Each room's entries after its last id (or the error reading it), in ``rooms`` order.

        On one Redis node this is a single non-blocking ``XREAD`` over every room: one command
        and one reply instead of a pipelined ``XRANGE`` per room, which is most of the cost of
        a wake-up when rooms are small. A cluster (keys on several nodes), or an ``XREAD`` that
        one bad key fails as a whole, takes the per-room ``XRANGE`` pipeline, where a failure
        stays with its room."""
        conn = self._fetch_conn
        if conn is not None and rooms:
            if conn.is_connected and await is_stale(conn):
                await conn.disconnect(nowait=True)  # closed while idle: the send reconnects
            command: list[str | int] = ["XREAD", "COUNT", self._fetch_count, "STREAMS"]
            command += [room.key for room in rooms]
            command += [room.last_id or "0-0" for room in rooms]  # initialised: never None here
            await conn.send_packed_command(pack_command(command), check_health=False)
            try:
                reply: Any = await conn.read_response()
            except ResponseError as exc:  # the error reply was read whole: the stream is in step
                logger.debug("XREAD of %d rooms failed (%s); reading room by room", len(rooms), exc)
            else:
                by_key: dict[str, list[_Entry]] = {
                    _text(key): [(entry_id, _field_map(fields)) for entry_id, fields in entries]
                    for key, entries in reply or ()
                }
                return [by_key.get(room.key, []) for room in rooms]
        pipe = client.pipeline(transaction=False)
        for room in rooms:
            pipe.xrange(room.key, f"({room.last_id}", "+", count=self._fetch_count)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _deliver(self, publication: Publication) -> None:
        handler = self._handler
        if handler is None:
            self.dropped["no_handler"] += 1
            logger.warning(
                "dropped entry %s of room %r: no_handler", publication.offset, publication.room
            )
            return
        try:
            handler(publication)
        except Exception:
            # Task boundary: the node's handler failed for this publication only.
            self.dropped["handler_error"] += 1
            logger.exception(
                "dropped entry %s of room %r: handler_error", publication.offset, publication.room
            )
            return
        self.delivered += 1

    def _decode_entries(
        self, room: str, entries: list[_Entry], *, reason_prefix: str
    ) -> list[tuple[str, Publication | None]]:
        """Decode entries; a malformed one is counted, logged and returned as ``None``.

        Deliveries count under ``malformed_envelope``, history reads under
        ``history_malformed_envelope`` (``reason_prefix``), so one entry is not counted twice
        as an undelivered publication.
        """
        decoded: list[tuple[str, Publication | None]] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            try:
                decoded.append((entry_id, decode_envelope(entry_id, fields, room=room)))
            except EnvelopeError as exc:
                reason = f"{reason_prefix}malformed_envelope"
                self.dropped[reason] += 1
                logger.warning("dropped entry %s of room %r: %s (%s)", entry_id, room, reason, exc)
                decoded.append((entry_id, None))
        return decoded

    async def _claim_idempotency_keys(
        self, client: _Client, publications: list[Publication], *, claim: bool = True
    ) -> set[str]:
        """Offsets of publications whose idempotency key belongs to another entry.

        With ``claim``, an unclaimed key is claimed for the entry (``SET NX GET``), so every
        instance, in any order, agrees on which entry of a key is the one to deliver.
        """
        keyed = [pub for pub in publications if pub.idempotency_key is not None]
        if not keyed:
            return set()
        pipe = client.pipeline(transaction=False)
        for pub in keyed:
            key = self._keys.idempotency(pub.room, pub.idempotency_key or "")
            if claim:
                pipe.set(
                    key, f"{pub.id}|{pub.offset}", nx=True, get=True, px=self._idempotency_window_ms
                )
            else:
                pipe.get(key)
        results = await pipe.execute()
        duplicates: set[str] = set()
        reason = "duplicate_idempotency_key" if claim else "history_duplicate_idempotency_key"
        for pub, stored in zip(keyed, results, strict=True):
            if stored is None:
                continue
            _, _, owner = _text(stored).partition("|")
            if owner != pub.offset:
                duplicates.add(pub.offset)
                self.dropped[reason] += 1
                logger.info(
                    "dropped entry %s of room %r: %s %r (first: %s)",
                    pub.offset,
                    pub.room,
                    reason,
                    pub.idempotency_key,
                    owner,
                )
        return duplicates

    async def _decode_and_filter(
        self, client: _Client, room: str, entries: list[_Entry], *, claim: bool
    ) -> list[Publication]:
        pairs = self._decode_entries(room, entries, reason_prefix="history_" if not claim else "")
        decoded = [pub for _, pub in pairs if pub is not None]
        skip = await self._claim_idempotency_keys(client, decoded, claim=claim)
        return [pub for pub in decoded if pub.offset not in skip]

    async def _initialise_rooms(self, client: _Client, rooms: list[_Room]) -> None:
        """Start each room at its stream's last entry.  A room Redis refuses (its key is not
        a stream) is counted and logged, and reads fail for it alone: one bad room never stops
        the others, nor a reconnect."""
        pipe = client.pipeline(transaction=False)
        for room in rooms:
            pipe.xrevrange(room.key, "+", "-", count=1)
        results = await pipe.execute(raise_on_error=False)
        for room, result in zip(rooms, results, strict=True):
            if isinstance(result, UNAVAILABLE_ERRORS):
                raise result
            if room.last_id is not None:
                continue
            if isinstance(result, Exception):
                self.errors["read_failed"] += 1
                logger.error("cannot start room %r at %s: %s", room.name, room.key, result)
                room.last_id = "0-0"
            else:
                room.last_id = _text(result[0][0]) if result else "0-0"

    async def _last_entry_id(self, client: _Client, key: str) -> str:
        result: Any = await client.xrevrange(key, "+", "-", count=1)
        return _text(result[0][0]) if result else "0-0"

    async def _watch(self) -> None:
        """Ping the pub/sub connections; on a cluster, restart the epoch when slots move."""
        client = await self._ensure_client()
        while True:
            await asyncio.sleep(self._ping_interval)
            silent_since = time.monotonic() - 3 * self._ping_interval
            for name, heard in self._last_heard.items():
                if name in self._listeners and heard < silent_since:
                    raise RedisTimeoutError(f"no reply from {name} on the pub/sub connection")
            async with self._deadline():
                for conn in list(self._listeners.values()):
                    await conn.send_command("PING", check_health=False)
                if isinstance(client, RedisCluster):
                    topology = await self._read_topology(client)
                    if topology != self._topology:
                        raise _TopologyChangedError("cluster slots moved")

    async def _read_topology(self, client: RedisCluster) -> frozenset[tuple[int, int, str]]:
        slots = await client.execute_command("CLUSTER SLOTS", target_nodes=client.get_random_node())
        topology: set[tuple[int, int, str]] = set()
        for (start, end), owners in dict(slots).items():
            host, port = owners["primary"][:2]
            topology.add((int(start), int(end), f"{_text(host)}:{int(port)}"))
        return frozenset(topology)


_COALESCE_SECONDS: Final = 0.002
"""How long a wake-up waits for more notifications, so one fetch serves many rooms."""

_WAITED_SECONDS: Final = 0.0002
"""A pub/sub read that took longer than this waited for data: the start of a burst."""

CLOCK_MARGIN_MS: Final = 5_000
"""Allowed disagreement between the gateway's clock and Redis's (offsets carry Redis time)."""


def _history_complete(after: tuple[int, int], info: object, now_ms: int, ttl_ms: int) -> bool:
    """Whether every entry of the stream newer than ``after`` is still there.

    Every publish refreshes the key's TTL, so an entry published after ``after`` keeps the key
    alive at least until ``after``'s time + ``ttl_ms``: if that moment has not come (``recent``),
    a missing or re-created stream lost nothing after ``after``.  Trimming removes entries from
    the head, all older than the first entry; ``XDEL`` is tracked by ``max-deleted-entry-id``
    (which Redis 7.0 does not update when trimming, so trimming is judged by the first entry).
    """
    recent = after != (0, 0) and now_ms - after[0] < ttl_ms - CLOCK_MARGIN_MS
    if isinstance(info, Exception):  # no stream: never used, or expired
        return after == (0, 0) or recent
    fields = {_text(k): v for k, v in dict(info).items()}  # type: ignore[call-overload]
    if after < parse_offset(_text(fields.get("max-deleted-entry-id", b"0-0"))):
        return False
    first = fields.get("first-entry")
    first_id = parse_offset(_text(first[0])) if first else None
    if fields.get("entries-added") == fields.get("length"):
        # Nothing removed from this stream; if it was re-created after expiring, the old one's
        # entries after `after` survive only if `after` is recent.
        return first_id is None or first_id <= after or after == (0, 0) or recent
    # Entries were trimmed: all of them older than the first entry that is left.
    return first_id is not None and first_id <= after


async def _on_node(client: _Client, node: ClusterNode | None, *args: str) -> Any:
    if node is None:
        return await client.execute_command(*args)
    return await client.execute_command(*args, target_nodes=node)


def _node_connection(node: ClusterNode) -> AbstractConnection:
    options = dict(node.connection_kwargs)
    return node.connection_class(**options)


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for index in range(0, len(items), size):
        yield list(items[index : index + size])
