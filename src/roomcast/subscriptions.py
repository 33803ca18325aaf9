"""Keeps the broker's room subscriptions in step with the hub, in order per room."""

from __future__ import annotations

import asyncio
import logging

from roomcast.broker.base import Broker, BrokerError, BrokerUnavailableError
from roomcast.tasks import TaskSet

log = logging.getLogger("roomcast.subscriptions")


class Subscriptions:
    """``want(room)`` / ``drop(room)`` are called synchronously by the hub; the broker calls
    run one after another per room, so a quick join-leave-join ends subscribed."""

    def __init__(self, broker: Broker, tasks: TaskSet) -> None:
        self._broker = broker
        self._tasks = tasks
        self._last: dict[str, asyncio.Task[None]] = {}
        self._active: set[str] = set()

    def is_active(self, room: str) -> bool:
        return room in self._active and room not in self._last

    async def wait(self, room: str) -> None:
        """Return once every queued change of ``room`` was applied; raise the broker's
        :class:`BrokerError` if it refused the room for good."""
        task = self._last.get(room)
        if task is not None:
            await asyncio.shield(task)

    def want(self, room: str) -> None:
        self._chain(room, True)

    def drop(self, room: str) -> None:
        self._chain(room, False)

    def _chain(self, room: str, subscribe: bool) -> None:
        previous = self._last.get(room)
        task = self._tasks.spawn(self._apply(room, subscribe, previous), name=f"subscribe-{room}")
        self._last[room] = task
        task.add_done_callback(lambda t: self._done(room, t))

    def _done(self, room: str, task: asyncio.Task[None]) -> None:
        if self._last.get(room) is task:
            del self._last[room]

    async def _apply(self, room: str, subscribe: bool, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            if subscribe:
                await self._broker.subscribe(room)
                self._active.add(room)
            else:
                self._active.discard(room)
                await self._broker.unsubscribe(room)
        except BrokerUnavailableError as exc:
            # The broker re-applies its subscriptions when it reconnects.
            log.warning(
                "broker %s of room %s deferred: %s",
                "subscribe" if subscribe else "unsubscribe",
                room,
                exc,
            )
            if subscribe:
                self._active.add(room)
        except BrokerError:
            # Refused for good (a reconnect would not mend it): whoever waits for the room
            # gets the error from wait(); the task's failure is logged and counted.
            self._active.discard(room)
            raise
