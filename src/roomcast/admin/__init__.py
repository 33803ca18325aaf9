"""The server side of the Socket.IO Admin UI (``@socket.io/admin-ui`` 0.5), for its own UI.

Enabled by ``admin_username`` and ``admin_password_hash``: the node then serves the namespace
``admin_namespace`` (``/admin``), which is the gateway's own (no JWT: the login is the UI's,
:mod:`roomcast.admin.auth`).  Every instance is one server in the UI, and every page covers
every instance: the parts talk over the cluster's control channel.

* :mod:`~roomcast.admin.tap`: what each instance records and sends (only while watched);
* :mod:`~roomcast.admin.stats`: each instance's ``server_stats``;
* :mod:`~roomcast.admin.console`: the instance an Admin UI is connected to;
* :mod:`~roomcast.admin.actions`: the UI's actions, through the server API (every instance);
* this module: the namespace (the login, the handlers) and the wiring.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from roomcast.admin.actions import Actions
from roomcast.admin.auth import SESSION_TTL_S, AdminAuth, LoginRefusedError, session_digest
from roomcast.admin.console import Console
from roomcast.admin.stats import InstanceStats
from roomcast.admin.tap import Tap
from roomcast.app import Application, ConnectRefusedError
from roomcast.broker.base import BrokerError
from roomcast.broker.topics import InvalidNamespaceError, validate_namespace
from roomcast.cluster import Cluster
from roomcast.config import ConfigError, Settings
from roomcast.connection import Connection
from roomcast.metrics import Metrics
from roomcast.operator import Selector
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
        try:
            self.namespace = validate_namespace(settings.admin_namespace)
        except InvalidNamespaceError as exc:
            raise ConfigError(f"admin_namespace: {exc}") from None
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
        self.actions = Actions(cluster, metrics, readonly=self.readonly)
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
        try:
            return await self.tap.snapshot(_text(args, "watcher"), _text(args, "ref"), limit)
        except BrokerError as exc:  # answered as an error: the watcher counts us missing
            raise ValueError(f"socket list not sent: {exc}") from exc

    async def _on_session(self, selector: Selector, args: dict[str, Any]) -> dict[str, Any]:
        until = args.get("until")
        if (
            not isinstance(until, int | float)
            or isinstance(until, bool)
            or not math.isfinite(until)
            or until > time.time() + SESSION_TTL_S + 60
        ):
            raise TypeError("until: must be a time within a session's lifetime")
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
        app.on("join", name)(self.actions.join)
        app.on("leave", name)(self.actions.leave)
        app.on("_disconnect", name)(self.actions.disconnect)
        app.on("emit", name)(self.actions.emit)
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
        finally:
            auth.pop("password", None)  # the socket keeps its auth payload: not the password
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


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key}: must be a non-empty string")
    return value
