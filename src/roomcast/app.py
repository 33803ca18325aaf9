"""The Python API for logic inside the gateway.

    app = Application()

    @app.on_connect()
    async def hello(socket: Socket) -> None:
        socket.emit("welcome", {"user": socket.user_id})

    @app.on("echo")
    async def echo(socket: Socket, text: str) -> str:
        return text            # becomes the client's ack

    @app.on("review", namespace="/docs")
    async def review(socket: Socket, doc: str) -> dict[str, Any]:
        # every socket in room doc of /docs, on every instance, within 5 s
        result = await app.of("/docs").to(doc).timeout(5).emit_with_ack("approve?", doc)
        return {"yes": result.responses.count(True), "silent": len(result.missing)}
    @app.on("comment", schema={"type": "object", "required": ["text"],
                               "properties": {"text": {"type": "string", "maxLength": 500}}})
    async def comment(socket: Socket, data: dict[str, Any]) -> None:
        ...                    # only called with a payload that matches the schema

Handlers are checked when they are registered: they must be ``async def`` and take the socket
first; the number of event arguments they accept is recorded, and an event that does not fit is
refused with a counted error instead of calling the handler and catching ``TypeError``.

A handler registered with ``schema=`` (JSON Schema draft-07, compiled when registered) is
called only with a payload that matches it: the one argument, or the array of arguments when
there are none or several (:func:`roomcast.schemas.payload_of`). Otherwise the client's ack
gets ``{"ok": false, "error": {"code": "invalid_payload", "message", "details"}}``, and an
event without an ack is dropped, counted and logged. The same schema describes the event in
the AsyncAPI document (``roomcast asyncapi``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from roomcast.broker.topics import validate_namespace
from roomcast.operator import BroadcastOperator, Selector, ServerApi
from roomcast.schemas import EventSchema

EventHandler = Callable[..., Coroutine[Any, Any, Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class HandlerSignatureError(TypeError):
    """A handler cannot be registered: the message says why."""


class ConnectRefusedError(Exception):
    """Raise from a ``before_connect`` handler to refuse a namespace with a CONNECT_ERROR."""

    def __init__(self, message: str, code: str = "forbidden") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Registered:
    handler: EventHandler
    min_args: int
    max_args: int | None
    """``None`` when the handler takes ``*args``."""
    schema: EventSchema | None = None
    """What the event's payload must match before the handler is called."""

    def accepts(self, count: int) -> bool:
        return count >= self.min_args and (self.max_args is None or count <= self.max_args)


def _register(handler: Callable[..., Any], what: str, *, fixed: int | None = None) -> Registered:
    if not inspect.iscoroutinefunction(handler):
        raise HandlerSignatureError(f"{what} handler {handler.__qualname__} must be async def")
    params = list(inspect.signature(handler).parameters.values())
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    required_kw = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    if required_kw:
        raise HandlerSignatureError(
            f"{what} handler {handler.__qualname__} has required keyword-only {required_kw[0]!r}"
        )
    if not positional:
        raise HandlerSignatureError(
            f"{what} handler {handler.__qualname__} must take the socket as first argument"
        )
    rest = positional[1:]
    min_args = sum(1 for p in rest if p.default is inspect.Parameter.empty)
    max_args = None if variadic else len(rest)
    if fixed is not None and not (min_args <= fixed and (max_args is None or fixed <= max_args)):
        raise HandlerSignatureError(
            f"{what} handler {handler.__qualname__} must accept exactly {fixed} argument(s) "
            "after the socket"
        )
    return Registered(handler, min_args, max_args)


@dataclass(slots=True)
class Namespace:
    name: str
    events: dict[str, Registered] = field(default_factory=dict)
    before_connect: list[Registered] = field(default_factory=list)
    connect: list[Registered] = field(default_factory=list)
    disconnect: list[Registered] = field(default_factory=list)
    internal: bool = False
    """A namespace of the gateway itself (the Admin UI's, :mod:`roomcast.admin`): its
    ``before_connect`` hooks authenticate instead of the JWT, and its sockets reach its own
    handlers only (no built-in or upstream events, no connection state recovery)."""


class Application:
    """Handlers per namespace, and the server-side API.  The main namespace ``/`` always exists.

    An application serves one node: the node attaches itself when it starts, and from then on
    :meth:`of` and :meth:`to` reach every instance (from handlers, and from tasks started by
    :meth:`on_startup` hooks).
    """

    def __init__(self) -> None:
        self.namespaces: dict[str, Namespace] = {"/": Namespace("/")}
        self.startup: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._api: ServerApi | None = None

    # -- the server-side API --------------------------------------------------------------------
    def attach(self, api: ServerApi | None) -> None:
        """Called by the node: the server API to act through (``None`` once it stops)."""
        self._api = api

    def _server_api(self) -> ServerApi:
        if self._api is None:
            raise RuntimeError("the application is not served by a started node")
        return self._api

    def of(self, namespace: str) -> BroadcastOperator:
        """Every socket of ``namespace``, on every instance; narrow with ``.to(room)`` etc.

        The namespace must be one the application defines (a handler or :meth:`namespace`)."""
        if validate_namespace(namespace) not in self.namespaces:
            raise ValueError(f"namespace {namespace!r}: not defined by the application")
        return BroadcastOperator(self._server_api, Selector(namespace))

    def to(self, *rooms: str) -> BroadcastOperator:
        """``of("/").to(*rooms)``."""
        return self.of("/").to(*rooms)

    in_ = to

    def on_startup(
        self, handler: Callable[[], Coroutine[Any, Any, None]]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        """Register ``async () -> None``, run as a task once the node serves (cancelled when it
        stops): the place for the application's own background work."""
        self.startup.append(handler)
        return handler

    def namespace(self, name: str) -> Namespace:
        """The namespace ``name``, defined now if new (see :func:`validate_namespace`)."""
        return self.namespaces.setdefault(validate_namespace(name), Namespace(name))

    def on(
        self, event: str, namespace: str = "/", *, schema: dict[str, Any] | bool | None = None
    ) -> Callable[[F], F]:
        """Register the handler of a client event; its return value is the ack.

        With ``schema`` (JSON Schema draft-07), the handler is called only with a payload that
        matches it; a bad schema raises :class:`roomcast.schemas.SchemaError` here."""
        compiled = None if schema is None else EventSchema(event, schema)

        def decorator(handler: F) -> F:
            registered = _register(handler, f"event {event!r}")
            if compiled is not None:
                registered = dataclasses.replace(registered, schema=compiled)
            self.namespace(namespace).events[event] = registered
            return handler

        return decorator

    def before_connect(self, namespace: str = "/") -> Callable[[F], F]:
        """Register ``async (socket, auth: dict) -> None``; raise ConnectRefusedError to refuse."""

        def decorator(handler: F) -> F:
            reg = _register(handler, "before_connect", fixed=1)
            self.namespace(namespace).before_connect.append(reg)
            return handler

        return decorator

    def on_connect(self, namespace: str = "/") -> Callable[[F], F]:
        """Register ``async (socket) -> None``, run after the client got its CONNECT answer."""

        def decorator(handler: F) -> F:
            self.namespace(namespace).connect.append(_register(handler, "connect", fixed=0))
            return handler

        return decorator

    def on_disconnect(self, namespace: str = "/") -> Callable[[F], F]:
        """Register ``async (socket, reason: str) -> None``."""

        def decorator(handler: F) -> F:
            reg = _register(handler, "disconnect", fixed=1)
            self.namespace(namespace).disconnect.append(reg)
            return handler

        return decorator
