"""The in-memory broker's own housekeeping (the shared behaviour is in the contract suite)."""

from __future__ import annotations

import asyncio

from roomcast.broker.base import PublishRequest
from roomcast.broker.memory import MemoryBroker


async def test_idle_rooms_history_is_swept_and_reported_incomplete() -> None:
    """History of a room nobody publishes to any more is dropped, and a recovery past it is refused."""
    broker = MemoryBroker(history_size=10, history_ttl_ms=50)
    await broker.start(lambda publication: None)
    first = await broker.publish(PublishRequest(room="doc:idle", event="e", data=1))
    await broker.publish(PublishRequest(room="doc:idle", event="e", data=2))
    await asyncio.sleep(0.12)
    broker._next_history_sweep_ms = 0  # the sweep runs at most once a second; allow it now
    await broker.publish(PublishRequest(room="doc:busy", event="e", data=3))
    assert "doc:idle" not in broker._history
    history = await broker.history("doc:idle", first.offset)
    assert history.publications == [] and history.complete is False


async def test_room_never_published_to_is_complete_for_a_recent_offset() -> None:
    """A room with no history at all is complete for an offset younger than the history TTL."""
    broker = MemoryBroker(history_size=10, history_ttl_ms=60_000)
    await broker.start(lambda publication: None)
    recent = await broker.publish(PublishRequest(room="doc:other", event="e", data=1))
    assert (await broker.history("doc:quiet", recent.offset)).complete is True
    assert (await broker.history("doc:quiet", "1000-0")).complete is False
