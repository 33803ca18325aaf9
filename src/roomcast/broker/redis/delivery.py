"""Delivery of a Redis broker's subscribed rooms: notifications in, publications out.

The pub/sub readers hand every message to :meth:`Delivery.on_pubsub`.  A keyspace
notification marks its room dirty, and the processor task (:meth:`Delivery.process`) reads
every dirty room after the last entry it delivered, once per wake-up, and delivers in entry-id
order across rooms.  On a single server each publish also sends the entry on the room's feed
channel; when the entry is the next one for its room, it is delivered from the message without
reading the stream.  Because delivery always resumes from the last entry id, a missed
notification costs latency, never an entry, and nothing is delivered twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from roomcast.broker.base import BatchScope, DeliveryHandler, Publication
from roomcast.broker.envelope import EnvelopeError, decode_feed
from roomcast.broker.offsets import CLOCK_MARGIN_MS, OffsetError, parse_offset
from roomcast.broker.redis.connection import Client, Entry, chunks, field_map, text
from roomcast.broker.redis.entries import EntryFilter
from roomcast.broker.redis.errors import UNAVAILABLE_ERRORS
from roomcast.broker.redis.publish import is_stale, pack_command

__all__ = ["Delivery", "Room"]

logger = logging.getLogger("roomcast.broker")

_FETCH_CHUNK: Final = 256

_COALESCE_SECONDS: Final = 0.002
"""How long a wake-up waits for more notifications, so one fetch serves many rooms."""

_WAITED_SECONDS: Final = 0.0002
"""A pub/sub read that took longer than this waited for data: the start of a burst."""


@dataclass(slots=True, eq=False)
class Room:
    """A subscribed room.  A new object per subscription, so late results can be told apart."""

    name: str
    key: str
    channel: bytes
    """The keyspace-notification channel of the room's stream."""
    feed: bytes
    """The room's feed channel (subscribed on a single server only)."""
    last_id: str | None = None
    """The last entry delivered (or skipped); ``None`` until initialised from Redis."""


@dataclass(slots=True)
class _Fetched:
    room: Room
    entries: list[Entry]


OtherMessage = Callable[[object, bytes, object], None]
"""Called with ``(kind, channel, payload)`` for a pub/sub message of no subscribed room."""


class Delivery:
    """The subscribed rooms, and the reading and delivering of their new entries.

    Counters: ``delivered`` entries handed to the handler, ``fed`` those of them taken from
    feed messages; drops go to the broker's ``dropped``, other failures to its ``errors``.
    """

    def __init__(
        self,
        entries: EntryFilter,
        *,
        fetch_count: int,
        running_loop: Callable[[], asyncio.AbstractEventLoop],
        other_message: OtherMessage,
        dropped: collections.Counter[str],
        errors: collections.Counter[str],
    ) -> None:
        self._entries = entries
        self._fetch_count = fetch_count
        self._running_loop = running_loop
        self._other_message = other_message
        self._dropped = dropped
        self._errors = errors
        self.delivered = 0
        self.fed = 0
        self.handler: DeliveryHandler | None = None
        self.batch: BatchScope | None = None
        self.fetch_conn: AbstractConnection | None = None
        """Single node: the processor's own connection for ``XREAD`` (no pool checkout)."""
        self.rooms: dict[str, Room] = {}
        self._channels: dict[bytes, Room] = {}
        self._dirty: set[str] = set()
        self._fetching = False
        """The processor is reading rooms: feed messages wait for it (entry order)."""
        self._fed: list[tuple[tuple[int, int], Room, Publication]] = []
        """Entries taken from feed messages in the current burst, delivered at its end."""
        self._wake = asyncio.Event()
        self._wake_due = False
        """A wake-up of the processor is scheduled for the end of the current callback."""

    # ------------------------------------------------------------------ rooms

    def add(self, room: Room) -> None:
        self.rooms[room.name] = room
        self._channels[room.channel] = room
        self._channels[room.feed] = room

    def remove(self, name: str, room: Room | None = None) -> Room | None:
        """Stop delivering ``name`` (only if it is still ``room``, when given)."""
        state = self.rooms.get(name)
        if state is None or (room is not None and state is not room):
            return None
        del self.rooms[name]
        self._channels.pop(state.channel, None)
        self._channels.pop(state.feed, None)
        self._dirty.discard(name)
        return state

    def mark_dirty(self, rooms: Iterable[Room]) -> None:
        """Mark rooms for the processor, which wakes once the current callback is done: a
        reader handles a whole burst in one callback, and the feed messages of the burst
        usually take back what its notifications marked, so the processor is not woken for
        nothing once per burst."""
        for room in rooms:
            self._dirty.add(room.name)
        if self._dirty and not self._wake_due:
            self._running_loop().call_soon(self._wake_processor)
            self._wake_due = True

    # ------------------------------------------------------------------ pub/sub

    async def read(self, conn: AbstractConnection, heard: dict[str, float], name: str) -> None:
        """Turn the messages of one pub/sub connection into deliveries; ``heard[name]`` is when
        it last answered (the watcher's pings keep data flowing).

        No timeout per read (one would cost a timer per notification): the watcher notices a
        connection that stopped answering its pings and ends the epoch instead.

        A message that had to be waited for starts a burst: the reader sleeps the coalescing
        window before handling it, so the rest of the burst waits in the socket buffer and is
        handled in one go, instead of a task wake-up per message.  Messages already buffered
        are handled at once, in order: a feed message then always follows its entry's
        notification."""
        heard[name] = time.monotonic()
        clock = time.monotonic
        on_pubsub = self.on_pubsub
        while True:
            asked = clock()
            response = await conn.read_response(timeout=None)
            now = heard[name] = clock()
            if now - asked > _WAITED_SECONDS:
                await asyncio.sleep(_COALESCE_SECONDS)
            on_pubsub(response)

    def on_pubsub(self, response: object) -> None:
        if not isinstance(response, list) or len(response) < 3:
            return  # a PONG outside subscribed mode
        kind, channel, payload = response[0], response[1], response[2]
        room = self._channels.get(channel)
        if room is None:
            self._other_message(kind, channel, payload)
            return
        if kind == b"message":
            if channel == room.feed:
                self._on_feed(room, payload)
            elif payload == b"xadd":
                self.mark_dirty((room,))
        elif kind == b"subscribe" and channel == room.channel:
            # A confirmed subscription marks the room: its catch-up then runs strictly after
            # notifications flow, so an entry appended in between is never missed.
            self.mark_dirty((room,))

    def _on_feed(self, room: Room, payload: bytes) -> None:
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
            self.mark_dirty((room,))
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
            self._errors["bad_feed_message"] += 1
            logger.warning("bad feed message for room %r (%s); reading the stream", room.name, exc)
            self.mark_dirty((room,))
            return
        if self._entries.refuses(publication):
            self.mark_dirty((room,))  # the fetch reads it, then drops, counts and logs it
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
        batch = self.batch if self.batch is not None and len(fed) > 1 else nullcontext
        with batch():
            for _, room, publication in fed:
                if self.rooms.get(room.name) is room:  # else unsubscribed meanwhile
                    self.fed += 1
                    self._deliver(publication)

    def _wake_processor(self) -> None:
        self._wake_due = False
        if self._dirty:
            self._wake.set()

    # ------------------------------------------------------------------ processor

    async def process(self, client: Client, deadline: Callable[[], asyncio.Timeout]) -> None:
        """Fetch every dirty room once per wake-up and deliver in stream order."""
        while True:
            await self._wake.wait()
            # No wait here: the readers already slept the coalescing window before handling
            # the burst that woke this task, and every notification of it is in.
            self._wake.clear()
            if not self._dirty:  # feed messages took what the notifications announced
                continue
            names, self._dirty = self._dirty, set()
            rooms = [self.rooms[name] for name in names if name in self.rooms]
            self._fetching = True
            try:
                for chunk in chunks(rooms, _FETCH_CHUNK):
                    async with deadline():
                        await self._fetch_and_deliver(client, chunk)
            finally:
                self._fetching = False

    async def _fetch_and_deliver(self, client: Client, rooms: list[Room]) -> None:
        pending = [room for room in rooms if room.last_id is None]
        if pending:
            await self.initialise(client, pending)
        rooms = [room for room in rooms if room.last_id is not None]
        results = await self._read_rooms(client, rooms)
        fetched: list[_Fetched] = []
        for room, result in zip(rooms, results, strict=True):
            if isinstance(result, UNAVAILABLE_ERRORS):
                raise result
            if isinstance(result, Exception):
                self._errors["read_failed"] += 1
                logger.error("cannot read room %r from %s: %s", room.name, room.key, result)
                continue
            if len(result) >= self._fetch_count:
                self.mark_dirty((room,))  # more to read: next wake-up
            if result:
                fetched.append(_Fetched(room, result))
        if not fetched:
            return
        decoded = [
            (item.room, self._entries.decode(item.room.name, item.entries, reason_prefix=""))
            for item in fetched
        ]
        skip = await self._entries.duplicates(
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
        batch = self.batch if self.batch is not None and len(merged) > 1 else nullcontext
        with batch():
            for _, room, entry_id, publication in merged:
                if self.rooms.get(room.name) is not room:
                    continue  # unsubscribed meanwhile
                room.last_id = entry_id
                if publication is None or publication.offset in skip:
                    continue
                self._deliver(publication)

    async def _read_rooms(self, client: Client, rooms: list[Room]) -> list[Any]:
        """Each room's entries after its last id (or the error reading it), in ``rooms`` order.

        On one Redis node this is a single non-blocking ``XREAD`` over every room: one command
        and one reply instead of a pipelined ``XRANGE`` per room, which is most of the cost of
        a wake-up when rooms are small. A cluster (keys on several nodes), or an ``XREAD`` that
        one bad key fails as a whole, takes the per-room ``XRANGE`` pipeline, where a failure
        stays with its room."""
        conn = self.fetch_conn
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
                by_key: dict[str, list[Entry]] = {
                    text(key): [(entry_id, field_map(fields)) for entry_id, fields in entries]
                    for key, entries in reply or ()
                }
                return [by_key.get(room.key, []) for room in rooms]
        pipe = client.pipeline(transaction=False)
        for room in rooms:
            pipe.xrange(room.key, f"({room.last_id}", "+", count=self._fetch_count)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _deliver(self, publication: Publication) -> None:
        handler = self.handler
        if handler is None:
            self._dropped["no_handler"] += 1
            logger.warning(
                "dropped entry %s of room %r: no_handler", publication.offset, publication.topic
            )
            return
        try:
            handler(publication)
        except Exception:
            # Task boundary: the node's handler failed for this publication only.
            self._dropped["handler_error"] += 1
            logger.exception(
                "dropped entry %s of room %r: handler_error", publication.offset, publication.topic
            )
            return
        self.delivered += 1

    async def initialise(self, client: Client, rooms: list[Room]) -> None:
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
                self._errors["read_failed"] += 1
                logger.error("cannot start room %r at %s: %s", room.name, room.key, result)
                room.last_id = "0-0"
            else:
                room.last_id = text(result[0][0]) if result else "0-0"
