"""A room's history read from its stream, and whether that history is complete.

Recovery asks for a room's entries after the last offset a client saw; the answer says
whether some of them may be gone (trimmed, deleted or expired), in which case the client
is not told it recovered.
"""

from __future__ import annotations

import time
from typing import Any

from roomcast.broker.base import History
from roomcast.broker.keys import Keys
from roomcast.broker.offsets import CLOCK_MARGIN_MS, parse_offset
from roomcast.broker.redis.connection import RedisConnection, text
from roomcast.broker.redis.entries import EntryFilter
from roomcast.broker.redis.errors import REDIS_FAILURES, broker_error

__all__ = ["history_complete", "read_history"]


async def read_history(
    connection: RedisConnection,
    keys: Keys,
    entries: EntryFilter,
    room: str,
    after: tuple[int, int],
    *,
    ttl_ms: int,
) -> History:
    """Entries of ``room`` after ``after``; ``complete`` is false if any may be gone."""
    key = keys.room(room)
    start = "-" if after == (0, 0) else f"({after[0]}-{after[1]}"
    try:
        async with connection.deadline():
            client = await connection.ensure()
            pipe = client.pipeline(transaction=False)
            pipe.xrange(key, start, "+")
            pipe.xinfo_stream(key)
            found: Any
            found, info = await pipe.execute(raise_on_error=False)
            if isinstance(found, Exception):
                raise found
            publications = await entries.history(client, room, found)
    except REDIS_FAILURES as exc:
        raise broker_error(exc) from exc
    complete = history_complete(after, info, int(time.time() * 1000), ttl_ms)
    return History(publications=publications, complete=complete)


def history_complete(after: tuple[int, int], info: object, now_ms: int, ttl_ms: int) -> bool:
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
    fields = {text(k): v for k, v in dict(info).items()}  # type: ignore[call-overload]
    if after < parse_offset(text(fields.get("max-deleted-entry-id", b"0-0"))):
        return False
    first = fields.get("first-entry")
    first_id = parse_offset(text(first[0])) if first else None
    if fields.get("entries-added") == fields.get("length"):
        # Nothing removed from this stream; if it was re-created after expiring, the old one's
        # entries after `after` survive only if `after` is recent.
        return first_id is None or first_id <= after or after == (0, 0) or recent
    # Entries were trimmed: all of them older than the first entry that is left.
    return first_id is not None and first_id <= after
