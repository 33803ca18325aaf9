"""The Admin UI's actions: ``join``, ``leave``, ``_disconnect`` and ``emit``, on every instance.

The UI names the sockets as Socket.IO does, by a namespace and a *filter*: none (every socket
of the namespace), a room, or a socket id (in Socket.IO every socket is in a room named by its
id).  In Roomcast a socket id is not a room, so a filter reaches the socket of that id and the
sockets in the room of that name.  Each action goes through the server API
(:class:`roomcast.operator.BroadcastOperator`, the cluster's control channel), so it reaches
the sockets of every instance.  In read-only mode each is refused (counted, logged, no effect).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from roomcast.broker.base import BrokerError
from roomcast.cluster import Cluster
from roomcast.metrics import Metrics
from roomcast.operator import BroadcastOperator, Selector, SelectorError
from roomcast.protocol.errors import EventNameError
from roomcast.protocol.socketio import check_event_name
from roomcast.socket import Socket

__all__ = ["Actions"]

log = logging.getLogger("roomcast.admin")

REASON = "disconnected by an administrator"


class Actions:
    def __init__(self, cluster: Cluster, metrics: Metrics, *, readonly: bool) -> None:
        self._cluster = cluster
        self._metrics = metrics
        self.readonly = readonly

    def _targets(self, nsp: object, filter_: object) -> list[BroadcastOperator]:
        """What ``(nsp, filter)`` reaches, as operators whose reaches add up."""
        if not isinstance(nsp, str):
            raise SelectorError("namespace: must be a string")
        base = BroadcastOperator(lambda: self._cluster, Selector.from_json({"nsp": nsp}))
        if filter_ is None or filter_ == "":
            return [base]
        if not isinstance(filter_, str):
            raise SelectorError("filter: must be a room or a socket id")
        targets = [base.socket(filter_)]
        with contextlib.suppress(SelectorError):  # not a room name: a socket id alone
            targets.append(base.to(filter_))
        return targets

    async def _act(
        self,
        action: str,
        detail: str,
        targets: Callable[[], list[BroadcastOperator]],
        run: Callable[[BroadcastOperator], Awaitable[int]],
    ) -> None:
        metrics = self._metrics.admin_actions
        if self.readonly:
            metrics.labels(action, "readonly").inc()
            log.info("admin %s refused (read-only): %s", action, detail)
            return
        reached = 0
        try:
            for target in targets():
                reached += await run(target)
        except (SelectorError, EventNameError, ValueError) as exc:
            metrics.labels(action, "invalid").inc()
            log.info("admin %s refused: %s (%s)", action, exc, detail)
            return
        except BrokerError as exc:
            metrics.labels(action, "failed").inc()
            log.warning("admin %s failed: %s (%s)", action, exc, detail)
            return
        metrics.labels(action, "done").inc()
        log.info("admin %s: %s, %d sockets", action, detail, reached)

    # -- the handlers (``async (socket, *args)``, as the UI sends them) ----------------------
    async def join(self, socket: Socket, nsp: Any, room: Any, filter_: Any = None) -> None:
        async def run(target: BroadcastOperator) -> int:
            return (await target.sockets_join(_room(room))).sockets

        detail = f"{nsp} {filter_ or '*'} -> {room}"
        await self._act("join", detail, lambda: self._targets(nsp, filter_), run)

    async def leave(self, socket: Socket, nsp: Any, room: Any, filter_: Any = None) -> None:
        async def run(target: BroadcastOperator) -> int:
            return (await target.sockets_leave(_room(room))).sockets

        detail = f"{nsp} {filter_ or '*'} <- {room}"
        await self._act("leave", detail, lambda: self._targets(nsp, filter_), run)

    async def disconnect(
        self, socket: Socket, nsp: Any, close: Any = False, filter_: Any = None
    ) -> None:
        async def run(target: BroadcastOperator) -> int:
            return (await target.disconnect_sockets(REASON, close=close is True)).sockets

        detail = f"{nsp} {filter_ or '*'} close={close is True}"
        await self._act("disconnect", detail, lambda: self._targets(nsp, filter_), run)

    async def emit(self, socket: Socket, nsp: Any, filter_: Any, event: Any, *args: Any) -> None:
        async def run(target: BroadcastOperator) -> int:
            check_event_name(event)
            # Sent by every instance to its sockets, never a publication: a socket id has no
            # room stream, and the UI's emit is not one of the room's events to replay.
            results, _ = await self._cluster.request(
                "emit",
                target.selector,
                {"event": event, "args": list(args)},
                self._cluster.answer_timeout_s,
            )
            return sum(int(r.get("sockets", 0)) for r in results)

        detail = f"{nsp} {filter_ or '*'} {str(event)[:40]!r}"
        await self._act("emit", detail, lambda: self._targets(nsp, filter_), run)


def _room(value: object) -> str:
    if not isinstance(value, str):
        raise SelectorError("room: must be a string")
    return value
