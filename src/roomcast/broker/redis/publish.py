"""The Redis broker's publishing lane: publish scripts queued by every publisher go to Redis
over one dedicated connection, a batch per round trip, packed by hiredis.

The broker hands the lane a way to reach its client and its deadline; the lane owns its queue,
its task and its connection, and answers each publisher's future with its own reply, its own
error reply, or the failure that stopped its batch.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError

from roomcast.broker.base import BrokerError, BrokerUnavailableError

BATCH: Final = 512
"""Scripts sent in one write, at most."""

PUBLISH_LUA: Final = """
if KEYS[2] then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {0, seen} end
end
local previous = '0-0'
if ARGV[5] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if last[1] then previous = last[1][1] end
end
local xadd = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
for i = 7, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local offset = redis.call(unpack(xadd))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[2] then
  redis.call('SET', KEYS[2], ARGV[4] .. '|' .. offset, 'PX', ARGV[3])
end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], previous .. ' ' .. offset .. ' ' .. ARGV[6])
end
return {1, offset}
"""


_PUBLISH_SHA: Final = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()
"""What ``EVALSHA`` names the script by (Redis keys scripts by the SHA-1 of their body)."""


_Queued: TypeAlias = "tuple[list[str], list[str | int | bytes], asyncio.Future[Any]]"
"""A queued publish: its script's keys and arguments, and its publisher's future."""

_UNREAD: Final = object()
"""The reply of a queued publish that was not read (not sent, or the batch failed first)."""


def _settle(batch: list[_Queued], results: list[Any], failure: BaseException | None) -> None:
    """Resolve each publisher: its reply, its error reply, or ``failure`` if unread."""
    for (_, _, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if result is _UNREAD:
            future.set_exception(failure or BrokerError("publish reply missing"))
        elif isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


async def is_stale(conn: AbstractConnection) -> bool:
    """Whether a dedicated connection that sat idle was closed by Redis (a restart, its
    ``timeout`` setting, a proxy) or holds bytes nobody asked for. No system call: the event
    loop has already seen the end of the stream."""
    try:
        return bool(await conn.can_read())
    except RedisConnectionError:
        return True


def pack_command(args: Sequence[Any]) -> bytes:
    """One command in RESP, packed by hiredis (C).

    Raise redis-py's :class:`~redis.exceptions.DataError` for an argument it would refuse too
    (``None``, a bool, any other type), not hiredis's ``TypeError``."""
    try:
        packed: bytes = hiredis.pack_command(tuple(args))
    except TypeError:
        for arg in args:
            if isinstance(arg, bool) or not isinstance(arg, str | bytes | int | float | memoryview):
                raise DataError(
                    f"Invalid input of type: {type(arg).__name__!r}. "
                    "Convert to a bytes, string, int or float first."
                ) from None
        raise
    return packed


class _HiredisPacking:
    """Commands packed by hiredis in C.

    redis-py's asyncio connections pack every argument in Python (its sync ones already use
    hiredis); a publish script carries about twenty arguments, and packing them was the largest
    single cost of a publish. Multi-word command names (``"CONFIG GET"``) are split as redis-py
    does."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        words = name.split() if isinstance(name, str | bytes) else [name]
        if len(words) > 1:
            args = (*words, *args[1:])
        return [pack_command(args)]


def packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    return type(f"Packed{connection_class.__name__}", (_HiredisPacking, connection_class), {})


class PublishLane:
    """One dedicated connection for publishes, fed by a queue (see :meth:`_run`)."""

    def __init__(
        self,
        client: Callable[[], Awaitable[Any]],
        deadline: Callable[[], asyncio.Timeout],
        running_loop: Callable[[], asyncio.AbstractEventLoop],
    ) -> None:
        self._client = client
        self._deadline = deadline
        self._running_loop = running_loop
        """The broker's loop, looked up once (see ``RedisBroker._running_loop``)."""
        self._queue: list[_Queued] = []
        self._waiting = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None

    async def close(self, wait_s: float) -> None:
        """Stop the lane; publishers still queued get :class:`BrokerUnavailableError`."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=wait_s)

    def submit(self, keys: list[str], args: list[str | int | bytes]) -> asyncio.Future[Any]:
        """Queue one publish script; the future gets its reply (see :meth:`_run`)."""
        future: asyncio.Future[Any] = self._running_loop().create_future()
        self._queue.append((keys, args, future))
        if self._task is None:
            self._task = self._running_loop().create_task(
                self._run(), name="roomcast-redis-publish"
            )
        self._waiting.set()
        return future

    async def _run(self) -> None:
        """Send queued publish scripts over one dedicated connection, one batch at a time.

        Whatever is queued while a batch is in flight goes out as the next batch (up to
        ``BATCH`` scripts), in one write, so the number of round trips adapts to the
        load with no timer. No pool checkout, no redis-py pipeline object and no task per
        batch: at thousands of publishes a second those were most of a publish's cost."""
        try:
            while True:
                if not self._queue:
                    self._waiting.clear()
                    await self._waiting.wait()
                batch = self._queue[:BATCH]
                del self._queue[:BATCH]
                await self._send_publishes(batch)
        finally:
            self._task = None
            queued, self._queue = self._queue, []
            _settle(queued, [_UNREAD] * len(queued), BrokerUnavailableError("redis broker stopped"))
            await self._drop_conn()

    async def _send_publishes(self, batch: list[_Queued]) -> None:
        """Run one batch. Each publisher whose reply was read gets it (a result or its own
        error); the others get the failure that stopped the batch."""
        results: list[Any] = [_UNREAD] * len(batch)
        try:
            async with self._deadline():
                await self._eval_batch(batch, range(len(batch)), results, by_sha=True)
                retry = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
                if retry:  # Redis restarted or flushed its script cache: send those bodies
                    for i in retry:
                        results[i] = _UNREAD  # if the retry fails, these get its failure
                    await self._eval_batch(batch, retry, results, by_sha=False)
        except Exception as exc:  # noqa: BLE001 - not swallowed: each unanswered publisher gets it
            _settle(batch, results, exc)
            await self._drop_conn()  # a reply may be half read: never reuse it
            return
        except BaseException:  # cancelled by stop()
            _settle(batch, results, BrokerUnavailableError("redis broker stopped"))
            raise
        _settle(batch, results, None)

    async def _eval_batch(
        self, batch: list[_Queued], indices: Sequence[int], results: list[Any], *, by_sha: bool
    ) -> None:
        """Send the scripts of ``batch`` at ``indices`` in one write and store each reply (or
        error reply) in ``results`` as it is read."""
        conn = await self._connection()
        commands = []
        for i in indices:
            keys, args, _ = batch[i]
            head = ("EVALSHA", _PUBLISH_SHA) if by_sha else ("EVAL", PUBLISH_LUA)
            commands.append(pack_command((*head, len(keys), *keys, *args)))
        await conn.send_packed_command(b"".join(commands), check_health=False)  # connects
        for i in indices:
            try:
                results[i] = await conn.read_response()
            except ResponseError as exc:  # the error reply was read whole: the stream is in step
                results[i] = exc

    async def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is None:
            client = await self._client()
            conn = (
                client.connection_pool.make_connection()
            )  # one node: the lane is not used on a cluster
            self._conn = conn
        elif conn.is_connected and await is_stale(conn):
            await conn.disconnect(nowait=True)  # the next send reconnects
        return conn

    async def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
