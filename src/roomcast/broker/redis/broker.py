"""The Redis broker: one Redis Stream per room, woken by keyspace notifications.

Publishing is a plain ``XADD`` of an envelope (see :mod:`roomcast.broker.envelope`) to the room's
stream, so services in any language can publish.  An instance receives only the rooms it has
local members for: it subscribes to the keyspace-notification channel of each such room's
stream, and on ``xadd`` reads the new entries (``XREAD``) after the last entry it delivered.
Because delivery always resumes from that id, an outage or a missed notification costs latency,
never an entry, and nothing is delivered twice.  ``docs/redis.md`` explains the design.

:class:`RedisBroker` composes the parts, each in its own module, and supervises the
connection "epochs" (restarted with capped exponential backoff):

* :mod:`.connection`: the command client, cluster or not;
* :mod:`.delivery`: the subscribed rooms, one reader per pub/sub connection (one per cluster
  primary), and the processor that fetches dirty rooms and delivers;
* :mod:`.publish`: the publishing lane, which batches publish scripts on its own connection;
* :mod:`.notifications`: keyspace notifications, enabled or verified;
* :mod:`.entries`, :mod:`.history`, :mod:`.sessions`, :mod:`.upstream`: decoding and
  idempotency, recovery reads, recovery sessions, the upstream stream.

Here: the public API, the pub/sub connections, and a watcher that pings them and, on a
cluster, notices slot moves.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Final

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast.broker.base import (
    Admission,
    BatchScope,
    BrokerError,
    BrokerState,
    BrokerUnavailableError,
    ControlHandler,
    DeliveryHandler,
    History,
    PayloadCheck,
    Publication,
    PublishRequest,
    PublishResult,
    UserQuota,
)
from roomcast.broker.envelope import encode_envelope, encode_feed
from roomcast.broker.keys import Keys, keyspace_channel
from roomcast.broker.offsets import parse_offset
from roomcast.broker.redis.connection import (
    SINGLE_NODE,
    Client,
    RedisConnection,
    Topology,
    chunks,
    node_connection,
    text,
)
from roomcast.broker.redis.control import Control
from roomcast.broker.redis.delivery import Delivery, Room
from roomcast.broker.redis.entries import EntryFilter
from roomcast.broker.redis.errors import (
    REDIS_FAILURES,
    UNAVAILABLE_ERRORS,
    broker_error,
    unavailable,
)
from roomcast.broker.redis.history import read_history
from roomcast.broker.redis.notifications import Notifications
from roomcast.broker.redis.publish import PublishLane
from roomcast.broker.redis.sessions import RedisSessions
from roomcast.broker.redis.upstream import append_upstream
from roomcast.broker.redis.users import RedisUsers
from roomcast.broker.topics import validate_namespace, validate_topic

__all__ = ["RedisBroker"]

logger = logging.getLogger("roomcast.broker")

_SUBSCRIBE_CHUNK: Final = 500


class _TopologyChangedError(RedisError):
    """The cluster's slot map changed: subscriptions must be made again on the new owners."""


class RedisBroker:
    """A :class:`~roomcast.broker.base.Broker` on Redis (single server or Redis Cluster).

    Counters (read by metrics): ``dropped`` counts entries not delivered by reason,
    ``delivered`` the entries handed to the handler, ``reconnects`` the connection epochs
    after the first, ``errors`` failures that dropped no entry.
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
        payload_check: PayloadCheck | None = None,
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
        self._keys = Keys(prefix, upstream=upstream_stream)
        self._history_size = history_size
        self._history_ttl_ms = history_ttl_ms
        self._idempotency_window_ms = idempotency_window_ms
        self._upstream_maxlen = upstream_maxlen
        self._socket_timeout = socket_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._ping_interval = ping_interval

        self.instance_id = uuid.uuid4().hex[:16]
        self.dropped: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.reconnects = 0

        self._conn = RedisConnection(url, cluster=cluster, socket_timeout=socket_timeout)
        self._lane = PublishLane(self._conn.ensure, self._conn.deadline, self._conn.running_loop)
        self._entries = EntryFilter(
            self._keys,
            idempotency_window_ms=idempotency_window_ms,
            dropped=self.dropped,
            check=payload_check,
        )
        self._notifications = Notifications(
            self._conn, self._keys, instance_id=self.instance_id, ping_interval=ping_interval
        )
        self._control = Control(
            self._conn,
            self._keys,
            instance_id=self.instance_id,
            ping_interval=ping_interval,
            errors=self.errors,
        )
        self._delivery = Delivery(
            self._entries,
            fetch_count=fetch_count,
            running_loop=self._conn.running_loop,
            other_message=self._other_message,
            dropped=self.dropped,
            errors=self.errors,
        )
        self._sessions = RedisSessions(self._conn, self._keys)
        self._users = RedisUsers(self._conn, self._keys)

        self._state = BrokerState.STOPPED
        self._stopped = False
        """After :meth:`stop`: publishing is refused, so nothing reopens a connection."""
        self._supervisor: asyncio.Task[None] | None = None
        self._listeners: dict[str, AbstractConnection] = {}
        self._last_heard: dict[str, float] = {}
        """Per pub/sub connection, when it last delivered anything (a PONG at least)."""
        self._topology: Topology = frozenset()

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def ready(self) -> bool:
        """Connected, and keyspace notifications for streams are known to reach this instance."""
        return self._state is BrokerState.CONNECTED and self._notifications.ok

    @property
    def not_ready_reason(self) -> str | None:
        """Why :attr:`ready` is false, for health checks and logs."""
        if self._state is not BrokerState.CONNECTED:
            return f"redis broker {self._state.value}"
        return None if self._notifications.ok else self._notifications.not_ready_reason

    @property
    def is_cluster(self) -> bool:
        return self._conn.is_cluster

    @property
    def subscribed_rooms(self) -> frozenset[str]:
        return frozenset(self._delivery.rooms)

    @property
    def delivered(self) -> int:
        return self._delivery.delivered

    @property
    def fed(self) -> int:
        """Entries delivered from feed messages, without reading the stream."""
        return self._delivery.fed

    async def start(self, handler: DeliveryHandler, *, batch: BatchScope | None = None) -> None:
        """Connect, enable notifications, subscribe, and deliver in a background task.

        Raise :class:`BrokerUnavailableError` if Redis cannot be reached at all; later outages
        are survived by reconnecting.
        """
        if self._supervisor is not None:
            raise BrokerError("redis broker already started")
        self._delivery.handler = handler
        self._delivery.batch = batch
        self._stopped = False
        self._state = BrokerState.STARTING
        try:
            async with self._conn.deadline(epoch=True):
                await self._conn.ensure()
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
        await self._control.withdraw()  # the watcher is stopped: it cannot announce again
        await self._lane.close(self._socket_timeout)
        await self._close_listeners()
        await self._conn.close()
        self._delivery.handler = None

    async def publish(self, request: PublishRequest) -> PublishResult:
        if self._stopped:
            raise BrokerUnavailableError("redis broker stopped")
        validate_namespace(request.namespace)
        room = validate_topic(request.topic)
        publication = Publication(
            room=request.room,
            namespace=request.namespace,
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
        keys = [self._keys.room(room)]
        if request.idempotency_key is not None:
            keys.append(self._keys.idempotency(room, request.idempotency_key))
        conn = self._conn
        try:
            if conn.client is None:  # connect first: only then is it known to be a cluster
                async with conn.deadline():
                    await conn.ensure()
            is_cluster = conn.is_cluster
            feed = (
                ("", "")  # a cluster would broadcast the message to every node
                if is_cluster
                else (self._keys.feed(room, conn.db), encode_feed(fields))
            )
            args: list[str | int | bytes] = [
                self._history_size,
                self._history_ttl_ms,
                self._idempotency_window_ms,
                publication.id,
                *feed,
            ]
            for name, value in fields.items():
                args += (name, value)
            if is_cluster:
                async with conn.deadline():
                    client = await conn.ensure()
                    appended, value = await conn.script(keys=keys, args=args, client=client)
            else:  # the batch carries the deadline: one timer per batch, not per publish
                appended, value = await self._lane.submit(keys, args)
        except REDIS_FAILURES as exc:
            # On a timeout the script may still have run: a retry needs the idempotency key.
            raise broker_error(exc) from exc
        if appended == 1:
            return PublishResult(id=publication.id, offset=text(value))
        original_id, _, offset = text(value).partition("|")
        return PublishResult(id=original_id, offset=offset, duplicate=True)

    async def subscribe(self, room: str) -> None:
        """Deliver ``room``'s entries newer than its stream's last entry right now.

        If Redis is unreachable, the room is still registered: the reconnect subscribes it and
        starts from the stream's last entry at that time.
        """
        validate_topic(room)
        delivery = self._delivery
        if room in delivery.rooms:
            return
        db = self._conn.db
        key = self._keys.room(room)
        state = Room(
            room, key, keyspace_channel(db, key).encode(), self._keys.feed(room, db).encode()
        )
        delivery.add(state)
        client = self._conn.client
        if self._state is BrokerState.STOPPED or client is None:
            return
        try:
            async with self._conn.deadline():
                last_id = await _last_entry_id(client, key)
                if state.last_id is None:
                    state.last_id = last_id
                if delivery.rooms.get(room) is state:
                    await self._send_to_listener(key, "SUBSCRIBE", *self._subscription(state))
        except REDIS_FAILURES as exc:
            error = broker_error(exc)
            if isinstance(error, BrokerUnavailableError):
                logger.warning(
                    "subscribe %r: redis unavailable (%s); it is subscribed on reconnect", room, exc
                )
                return
            # Redis refuses the room itself (its key is not a stream): no reconnect mends that.
            delivery.remove(room, state)
            self.errors["subscribe_failed"] += 1
            raise error from exc

    async def unsubscribe(self, room: str) -> None:
        state = self._delivery.remove(room)
        if state is None:
            return
        try:
            async with self._conn.deadline():
                await self._send_to_listener(state.key, "UNSUBSCRIBE", *self._subscription(state))
        except UNAVAILABLE_ERRORS as exc:
            # The connection is gone, and with it the subscription; reconnecting skips the room.
            logger.debug("unsubscribe %r: redis unavailable (%s)", room, exc)

    async def history(self, room: str, after_offset: str) -> History:
        """Entries of ``room`` after ``after_offset``; ``complete`` is false if any may be gone.

        See :func:`roomcast.broker.redis.history.history_complete` for how trimming, deletion
        and expiry are detected.
        """
        validate_topic(room)
        after = parse_offset(after_offset)
        return await read_history(
            self._conn, self._keys, self._entries, room, after, ttl_ms=self._history_ttl_ms
        )

    async def save_session(self, pid: str, state: bytes, ttl_ms: int) -> None:
        await self._sessions.save(pid, state, ttl_ms)

    async def write_sessions(self, items: list[tuple[str, bytes | None, int]]) -> None:
        await self._sessions.write(items)

    async def take_session(self, pid: str) -> bytes | None:
        return await self._sessions.take(pid)

    async def touch_sessions(self, pids: list[str], ttl_ms: int) -> None:
        await self._sessions.touch(pids, ttl_ms)

    def on_control(self, handler: ControlHandler) -> None:
        self._control.handler = handler

    async def send_control(self, message: bytes, instance: str | None = None) -> None:
        if self._stopped:
            raise BrokerUnavailableError("redis broker stopped")
        await self._control.send(message, instance)

    async def instances(self) -> list[str]:
        return await self._control.instances()

    async def revoke(self, entry: str, until_ms: int) -> None:
        await self._control.revoke(entry, until_ms)

    async def revocations(self) -> list[str]:
        return await self._control.revocations()

    async def admit_user(self, user: str, member: str, quota: UserQuota) -> Admission:
        return await self._users.admit(user, member, quota)

    async def release_users(self, held: list[tuple[str, str]]) -> None:
        await self._users.release(held)

    async def keep_users(self, held: list[tuple[str, str]], ttl_ms: int) -> None:
        await self._users.keep(held, ttl_ms)

    async def append_upstream(self, fields: dict[str, str | bytes]) -> str:
        """``XADD <prefix>:upstream [MAXLEN ~ upstream_maxlen] * <fields>``; return the entry id."""
        return await append_upstream(self._conn, self._keys, fields, maxlen=self._upstream_maxlen)

    # ------------------------------------------------------------------ epochs

    async def _ensure_client(self) -> Client:
        return await self._conn.ensure()

    def _node_name(self, key: str) -> str:
        return self._conn.node_name(key)

    async def _supervise(self) -> None:
        """Run epochs until stopped; reconnect with capped exponential backoff."""
        delay = self._backoff_initial
        opened = True  # start() opened the first epoch
        while True:
            if not opened:
                try:
                    async with self._conn.deadline(epoch=True):
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
                logger.info(
                    "redis broker reconnected; catching up %d rooms", len(self._delivery.rooms)
                )
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
        client = await self._conn.ensure()
        if isinstance(client, RedisCluster):
            await client.initialize()
            self._topology = await self._conn.read_topology(client)
        await self._notifications.enable(client)
        await self._open_listeners(client)
        rooms = self._delivery.rooms
        pending = [room for room in rooms.values() if room.last_id is None]
        if pending:
            await self._delivery.initialise(client, pending)
        by_node: dict[str, list[bytes]] = collections.defaultdict(list)
        for room in list(rooms.values()):
            by_node[self._conn.node_name(room.key)].extend(self._subscription(room))
        if self._control.handler is not None:
            # Classic pub/sub reaches every node's subscribers: one listener is enough.
            by_node[next(iter(self._listeners))].extend(self._control.channels)
        for name, channels in by_node.items():
            conn = self._listeners.get(name)
            if conn is None:
                raise _TopologyChangedError(f"no pub/sub connection to node {name}")
            for chunk in chunks(channels, _SUBSCRIBE_CHUNK):
                await conn.send_command("SUBSCRIBE", *chunk, check_health=False)
        await self._control.announce()  # after subscribing: no request is sent into a gap
        self._state = BrokerState.CONNECTED

    async def _run_epoch(self) -> None:
        """Run the readers, the processor and the watcher until one fails."""
        client = await self._conn.ensure()
        delivery = self._delivery
        try:
            async with asyncio.TaskGroup() as group:
                for name, conn in self._listeners.items():
                    group.create_task(
                        delivery.read(conn, self._last_heard, name),
                        name=f"roomcast-redis-read-{name}",
                    )
                group.create_task(
                    delivery.process(client, lambda: self._conn.deadline(epoch=True)),
                    name="roomcast-redis-process",
                )
                group.create_task(self._watch(client), name="roomcast-redis-watch")
                if self._notifications.config_refused:
                    group.create_task(
                        self._notifications.check(self._listeners, self._catch_up),
                        name="roomcast-redis-check",
                    )
        except* (*UNAVAILABLE_ERRORS, _TopologyChangedError) as group_error:
            first = group_error.exceptions[0]
            logger.warning(
                "redis connection lost (%s: %s); reconnecting", type(first).__name__, first
            )

    def _other_message(self, kind: object, channel: bytes, payload: object) -> None:
        """A pub/sub message of no room: a control message, or a notification probe's."""
        if kind == b"message" and self._control.on_message(channel, payload):
            return
        self._notifications.on_message(kind, channel, payload)

    def _catch_up(self) -> None:
        self._delivery.mark_dirty(self._delivery.rooms.values())

    async def _open_listeners(self, client: Client) -> None:
        nodes: list[tuple[str, AbstractConnection]] = []
        if isinstance(client, RedisCluster):
            for node in client.get_primaries():
                nodes.append((node.name, node_connection(node)))
        else:
            nodes.append((SINGLE_NODE, client.connection_pool.make_connection()))  # type: ignore[no-untyped-call]
            fetch_conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            self._delivery.fetch_conn = fetch_conn
            await fetch_conn.connect()
        for name, conn in nodes:
            self._listeners[name] = conn
        for conn in self._listeners.values():
            await conn.connect()  # type: ignore[no-untyped-call]

    async def _close_listeners(self) -> None:
        listeners = list(self._listeners.values())
        self._listeners.clear()
        fetch_conn, self._delivery.fetch_conn = self._delivery.fetch_conn, None
        if fetch_conn is not None:
            listeners.append(fetch_conn)
        for conn in listeners:
            await conn.disconnect(nowait=True)
        self._notifications.cancel_probes()

    def _subscription(self, room: Room) -> tuple[bytes, ...]:
        """The channels to subscribe for ``room``: its keyspace channel, and on a single server
        its feed (a cluster would broadcast every feed message to all its nodes)."""
        return (room.channel,) if self._conn.is_cluster else (room.channel, room.feed)

    async def _send_to_listener(self, key: str, *args: str | bytes) -> None:
        conn = self._listeners.get(self._conn.node_name(key))
        # Never let a send reconnect a dropped connection behind the reader's back.
        if conn is not None and conn.is_connected:
            await conn.send_command(*args, check_health=False)

    async def _watch(self, client: Client) -> None:
        """Ping the pub/sub connections; on a cluster, restart the epoch when slots move."""
        while True:
            await asyncio.sleep(self._ping_interval)
            silent_since = time.monotonic() - 3 * self._ping_interval
            for name, heard in self._last_heard.items():
                if name in self._listeners and heard < silent_since:
                    raise RedisTimeoutError(f"no reply from {name} on the pub/sub connection")
            async with self._conn.deadline():
                for conn in list(self._listeners.values()):
                    await conn.send_command("PING", check_health=False)
                await self._control.announce()
                if isinstance(client, RedisCluster):
                    topology = await self._conn.read_topology(client)
                    if topology != self._topology:
                        raise _TopologyChangedError("cluster slots moved")


async def _last_entry_id(client: Client, key: str) -> str:
    result: object = await client.xrevrange(key, "+", "-", count=1)
    return text(result[0][0]) if result else "0-0"  # type: ignore[index]
