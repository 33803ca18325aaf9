"""The server side of the Socket.IO Admin UI (``@socket.io/admin-ui`` 0.5), for its own UI.

Enabled by ``admin_username`` and ``admin_password_hash``: the node then serves the namespace
``admin_namespace`` (``/admin``), which is the gateway's own (no JWT: the login is the UI's,
:mod:`roomcast.admin.auth`).  Every instance is one server in the UI, and every page covers
every instance: the parts talk over the cluster's control channel.

* :mod:`~roomcast.admin.tap`: what each instance records and sends (only while watched);
* :mod:`~roomcast.admin.stats`: each instance's ``server_stats``;
* :mod:`~roomcast.admin.console`: the instance an Admin UI is connected to;
* this module: the namespace's handlers (login, the UI's actions) and the wiring.

The UI's actions (``join``, ``leave``, ``_disconnect``, ``emit``) go through the server API
(:class:`roomcast.operator.BroadcastOperator`), so they reach the sockets on every instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from roomcast.admin.auth import AdminAuth, LoginRefusedError, session_digest
from roomcast.admin.console import Console
from roomcast.admin.stats import InstanceStats
from roomcast.admin.tap import Tap
from roomcast.app import Application, ConnectRefusedError
from roomcast.broker.base import BrokerError
from roomcast.cluster import Cluster
from roomcast.config import ConfigError, Settings
from roomcast.connection import Connection
from roomcast.metrics import Metrics
from roomcast.operator import BroadcastOperator, Selector, SelectorError
from roomcast.protocol.errors import EventNameError
from roomcast.protocol.socketio import check_event_name
from roomcast.socket import Socket
from roomcast.sockets import SocketServer
from roomcast.tasks import TaskSet

__all__ = ["ADMIN_OUTBOUND_LIMIT", "Admin"]

log = logging.getLogger("roomcast.admin")

ADMIN_OUTBOUND_LIMIT: Final = 64 * 1024 * 1024
"""Bytes an Admin UI connection may have queued: a socket list of 10,000 sockets is several
megabytes, more than a client's limit (``outbound_buffer_limit``)."""
ACTIONS: Final = ("EMIT", "JOIN", "LEAVE", "DISCONNECT", "MJOIN", "MLEAVE", "MDISCONNECT")
ALWAYS: Final = ("AGGREGATED_EVENTS", "ALL_EVENTS")


class Admin:
    """The Admin UI's server side on one node."""

    def __init__(
        self,
        settings: Settings,
        sockets: SocketServer,
        cluster: Cluster,
        metrics: Metrics,
        tasks: TaskSet,
        sessions: Callable[[], Iterable[Connection]],
    ) -> None:
        self.namespace = settings.admin_namespace
        if self.namespace in sockets.app.namespaces:
            raise ConfigError(
                f"admin_namespace {self.namespace!r} is a namespace of the application"
            )
        self.readonly = settings.admin_readonly
        self._username = settings.admin_username
        self._sockets = sockets
        self._cluster = cluster
        self._metrics = metrics
        self._tasks = tasks
        self.auth = AdminAuth(settings.admin_username, settings.admin_password_hash)
        self._instance = instance = cluster.instance
        self.console = Console(
            self.namespace, settings.admin_socket_list_limit, cluster, tasks, metrics
        )
        self.tap = Tap(instance, sockets, cluster.send, self.console.on_feed, tasks, metrics)
        self.stats = InstanceStats(
            instance,
            sockets,
            metrics,
            sessions,
            lambda: [*sockets.app.namespaces, *sockets.internal],
        )
        self._new_sessions: dict[str, str] = {}
        """Admin socket id -> the session id its login made (sent once it connects)."""
        cluster.add_operation("admin.watch", self._on_watch)
        cluster.add_operation("admin.sockets", self._on_sockets)
        cluster.add_operation("admin.session", self._on_session)
        cluster.on_kind("admin.feed", self.console.on_feed)
        cluster.on_kind("admin.chunk", self.console.on_chunk)
        sockets.internal[self.namespace] = self._define()

    def upgraded(self, conn: Connection) -> None:
        """For the engines' ``on_upgrade``."""
        self.tap.upgraded(conn)

    @property
    def features(self) -> list[str]:
        return [*ALWAYS] if self.readonly else [*ACTIONS, *ALWAYS]

    # -- control operations (answered by every instance) -----------------------------------
    async def _on_watch(self, selector: Selector, args: dict[str, Any]) -> dict[str, Any]:
        watcher = _text(args, "watcher")
        fresh = self.tap.watch(watcher)
        return {"instance": self._instance, "fresh": fresh, "stats": self.stats.snapshot(watcher)}

    async def _on_sockets(self, selector: Selector, args: dict[str, Any]) -> dict[str, Any]:
        limit = args.get("limit")
        if not isinstance(limit, int) or limit < 1:
            raise TypeError("limit: must be a positive integer")
        return await self.tap.snapshot(_text(args, "watcher"), _text(args, "ref"), limit)

    async def _on_session(self, selector: Selector, args: dict[str, Any]) -> dict[str, Any]:
        until = args.get("until")
        if not isinstance(until, int | float):
            raise TypeError("until: must be a number")
        self.auth.remember(_text(args, "digest"), float(until))
        return {"instance": self._instance}

    # -- the namespace ------------------------------------------------------------------------
    def _define(self) -> Any:
        """The admin namespace, with its handlers (made with an application of its own)."""
        app = Application()
        name = self.namespace
        app.before_connect(name)(self._login)
        app.on_connect(name)(self._connected)
        app.on_disconnect(name)(self._disconnected)
        app.on("join", name)(self._join)
        app.on("leave", name)(self._leave)
        app.on("_disconnect", name)(self._disconnect)
        app.on("emit", name)(self._emit)
        namespace = app.namespaces[name]
        namespace.internal = True
        return namespace

    async def _login(self, socket: Socket, auth: dict[str, Any]) -> None:
        try:
            login = await self.auth.login(auth)
        except LoginRefusedError as refused:
            self._metrics.admin_logins.labels("busy" if refused.code == "busy" else "refused").inc()
            log.warning("admin login refused on %s: %s", socket.conn.request.client, refused.code)
            raise ConnectRefusedError(refused.message, refused.code) from None
        if login.session is None:
            self._metrics.admin_logins.labels("session").inc()
        else:
            self._metrics.admin_logins.labels("password").inc()
            self._new_sessions[socket.id] = login.session
            self._tasks.spawn(self._share(login.session), name="admin-session")
        log.info("admin %r connected from %s", self._username, socket.conn.request.client)
        socket.conn.limit = max(socket.conn.limit, ADMIN_OUTBOUND_LIMIT)

    async def _share(self, session_id: str) -> None:
        """Tell the other instances of a new session, so the UI may reconnect to any."""
        args = {
            "digest": session_digest(session_id),
            "until": time.time() + self.auth.session_ttl_s,
        }
        try:
            await self._cluster.request(
                "admin.session", Selector(), args, self._cluster.answer_timeout_s
            )
        except BrokerError as exc:
            log.warning("admin session not shared with the other instances: %s", exc)

    async def _connected(self, socket: Socket) -> None:
        session = self._new_sessions.pop(socket.id, None)
        if session is not None:
            socket.emit("session", session)
        socket.emit("config", {"supportedFeatures": self.features})
        self.console.add(socket)

    async def _disconnected(self, socket: Socket, reason: str) -> None:
        self._new_sessions.pop(socket.id, None)
        self.console.remove(socket)

    # -- the UI's actions ---------------------------------------------------------------------
    def _operator(self, nsp: object, filter_: object) -> BroadcastOperator:
        if not isinstance(nsp, str):
            raise SelectorError("namespace: must be a string")
        operator = BroadcastOperator(lambda: self._cluster, Selector.from_json({"nsp": nsp}))
        if filter_ is not None and filter_ != "":
            if not isinstance(filter_, str):
                raise SelectorError("filter: must be a room or a socket id")
            operator = operator.to(filter_)  # a socket id counts as that socket's room
        return operator

    async def _act(self, action: str, socket: Socket, detail: str, run: Any) -> None:
        metrics = self._metrics.admin_actions
        if self.readonly:
            metrics.labels(action, "readonly").inc()
            log.info("admin %s refused (read-only): %s", action, detail)
            return
        try:
            reach = await run()
        except (SelectorError, EventNameError, ValueError) as exc:
            metrics.labels(action, "invalid").inc()
            log.info("admin %s refused: %s (%s)", action, exc, detail)
            return
        except BrokerError as exc:
            metrics.labels(action, "failed").inc()
            log.warning("admin %s failed: %s (%s)", action, exc, detail)
            return
        metrics.labels(action, "done").inc()
        log.info("admin %s by %s: %s, %s", action, socket.user_id, detail, reach)

    async def _join(self, socket: Socket, nsp: Any, room: Any, filter_: Any = None) -> None:
        await self._act(
            "join",
            socket,
            f"{nsp} {filter_ or '*'} -> {room}",
            lambda: self._operator(nsp, filter_).sockets_join(_room(room)),
        )

    async def _leave(self, socket: Socket, nsp: Any, room: Any, filter_: Any = None) -> None:
        await self._act(
            "leave",
            socket,
            f"{nsp} {filter_ or '*'} <- {room}",
            lambda: self._operator(nsp, filter_).sockets_leave(_room(room)),
        )

    async def _disconnect(
        self, socket: Socket, nsp: Any, close: Any = False, filter_: Any = None
    ) -> None:
        await self._act(
            "disconnect",
            socket,
            f"{nsp} {filter_ or '*'} close={close is True}",
            lambda: self._operator(nsp, filter_).disconnect_sockets(
                "disconnected by an administrator", close=close is True
            ),
        )

    async def _emit(self, socket: Socket, nsp: Any, filter_: Any, event: Any, *args: Any) -> None:
        async def run() -> Any:
            check_event_name(event)
            selector = self._operator(nsp, filter_).selector
            # Always sent by every instance to its sockets (never a publication): the filter
            # may be a socket id, which no room stream carries.
            results, missing = await self._cluster.request(
                "emit",
                selector,
                {"event": event, "args": list(args)},
                self._cluster.answer_timeout_s,
            )
            return {"sockets": sum(int(r.get("sockets", 0)) for r in results), "missing": missing}

        await self._act("emit", socket, f"{nsp} {filter_ or '*'} {str(event)[:40]!r}", run)


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key}: must be a non-empty string")
    return value


def _room(value: object) -> str:
    if not isinstance(value, str):
        raise SelectorError("room: must be a string")
    return value
