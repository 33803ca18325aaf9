"""The upstream stream: client events that services consume, appended with ``XADD``."""

from __future__ import annotations

from roomcast.broker.keys import Keys
from roomcast.broker.redis.connection import RedisConnection, text
from roomcast.broker.redis.errors import REDIS_FAILURES, broker_error

__all__ = ["append_upstream"]


async def append_upstream(
    connection: RedisConnection,
    keys: Keys,
    fields: dict[str, str | bytes],
    *,
    maxlen: int | None,
) -> str:
    """``XADD <prefix>:upstream [MAXLEN ~ maxlen] * <fields>``; return the entry id."""
    if not fields:
        raise ValueError("fields: an upstream entry needs at least one field")
    try:
        async with connection.deadline():
            client = await connection.ensure()
            entry_id = await client.xadd(
                keys.upstream(),
                dict(fields),  # type: ignore[arg-type]
                maxlen=maxlen,
                approximate=True,
            )
    except REDIS_FAILURES as exc:
        raise broker_error(exc) from exc
    return text(entry_id)
