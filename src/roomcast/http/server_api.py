"""The server API over HTTP: list, count, join, leave, disconnect and emit with acks.

Every route sits on :class:`roomcast.operator.BroadcastOperator` (the same code as
``app.of(nsp)...`` in Python), so it reaches every instance.  Selectors: ``socket``, ``user``
and ``room`` (query parameters on GET, JSON fields on POST), each optional, plus ``namespace``
(default ``/``).  Every answer names the instances that did not answer in time
(``missing_instances``).

- ``GET /api/v1/sockets?room=R`` (or ``user=U``, ``socket=S``) ->
  ``{"sockets": [{"id", "user", "rooms", "instance", "transport", "connected_at",
  "namespace"}], "missing_instances": [...]}``
- ``GET /api/v1/rooms/R`` -> ``{"room", "namespace", "sockets": N, "users": M, ...}``
- ``POST /api/v1/sockets/join`` and ``/leave`` with a selector and ``"rooms": [...]``,
  ``POST /api/v1/sockets/disconnect`` with a selector and an optional ``"reason"`` ->
  ``{"sockets": N, "missing_instances": [...]}``
- ``POST /api/v1/emit`` with ``{"room", "event", "data", "timeout_ms"}`` (and the other
  selectors) -> ``{"acks": [{"socket", "response"}], "missing": [socket ids],
  "missing_instances": [...]}``
- ``POST /api/v1/revoke`` with ``{"user"}`` or ``{"jti", "exp"}`` -> ``{"sockets": N, ...}``:
  the matching sockets of every instance are disconnected with ``token_revoked``
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from roomcast.broker.base import BrokerError
from roomcast.broker.envelope import MAX_DATA_NESTING
from roomcast.broker.topics import MAIN
from roomcast.http.errors import ApiError, api_error_response, json_response
from roomcast.jsonbytes import BinaryMarkerError, decode_markers
from roomcast.metrics import Metrics
from roomcast.operator import BroadcastOperator, Reach, SelectorError
from roomcast.protocol.errors import EventNameError, SocketIOError
from roomcast.protocol.socketio import check_depth, check_event_name, holds_placeholder
from roomcast.schemas import EventSchema, InvalidPayloadError
from roomcast.tasks import TaskSet
from roomcast.transport.http import Exchange, Request

__all__ = ["ServerApiRoutes"]

log = logging.getLogger("roomcast.api")

MAX_TIMEOUT_MS = 60_000
_SELECTORS = ("socket", "user", "room", "namespace")


class ServerApiRoutes:
    """The ``/api/v1/sockets``, ``/api/v1/rooms/`` and ``/api/v1/emit`` routes."""

    def __init__(
        self,
        operator: Callable[[str], BroadcastOperator],
        *,
        revoke: Callable[..., Awaitable[Reach]],
        check_key: Callable[[Request], None],
        tasks: TaskSet,
        metrics: Metrics,
        max_payload: int,
        schemas: Mapping[str, EventSchema] | None = None,
    ) -> None:
        """``operator(namespace)`` is ``app.of``: it raises ``ValueError`` for a namespace the
        application does not define."""
        self._operator = operator
        self._revoke = revoke
        self._check_key = check_key
        self._tasks = tasks
        self._metrics = metrics
        self._max_payload = max_payload
        self._schemas = schemas or {}

    @staticmethod
    def serves(path: str) -> bool:
        return path in (
            "/api/v1/sockets",
            "/api/v1/sockets/join",
            "/api/v1/sockets/leave",
            "/api/v1/sockets/disconnect",
            "/api/v1/emit",
            "/api/v1/revoke",
        ) or path.startswith("/api/v1/rooms/")

    def handle(self, request: Request, exchange: Exchange) -> None:
        try:
            self._check_key(request)
            path = request.path
            if path == "/api/v1/sockets" or path.startswith("/api/v1/rooms/"):
                _method(request, "GET")
                call = self._list(request) if path == "/api/v1/sockets" else self._room(request)
            else:
                _method(request, "POST")
                body = self._body(request)
                action = path.rsplit("/", 1)[1]
                if action == "revoke":
                    call = self._revoke_tokens(body)
                elif action == "emit":
                    call = self._emit(body)
                else:
                    call = self._act(action, body)
        except ApiError as error:
            api_error_response(exchange, error)
            return
        self._tasks.spawn(self._answer(call, exchange, request.path), name="server-api")

    async def _answer(self, call: Any, exchange: Exchange, path: str) -> None:
        try:
            status, body = await call
            if not exchange.aborted:
                json_response(exchange, status, body)
        except ApiError as error:
            api_error_response(exchange, error)
            return
        except BrokerError as exc:
            self._metrics.dropped.labels("server_api_unavailable").inc()
            log.warning("%s: broker unavailable: %s", path, exc)
            api_error_response(exchange, ApiError(503, "broker_unavailable", str(exc)))
            return
        except Exception:  # task boundary: the caller must get an answer, never a hang
            log.exception("%s failed", path)
            api_error_response(exchange, ApiError(500, "internal_error", "server api failed"))

    def _body(self, request: Request) -> dict[str, Any]:
        if len(request.body) > self._max_payload:
            raise ApiError(413, "payload_too_large", f"body exceeds {self._max_payload} bytes")
        try:
            value = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"body is not valid json: {exc}") from exc
        if not isinstance(value, dict):
            raise ApiError(400, "invalid_body", "body must be a json object")
        return value

    def _select(self, fields: dict[str, Any], *, required: bool) -> BroadcastOperator:
        """The operator for the ``socket`` / ``user`` / ``room`` / ``namespace`` of ``fields``."""
        namespace = fields.get("namespace", MAIN)
        if not isinstance(namespace, str):
            raise ApiError(400, "invalid_namespace", "namespace must be a string")
        try:
            operator = self._operator(namespace)
        except ValueError as exc:
            raise ApiError(400, "unknown_namespace", str(exc)) from None
        if required and not any(fields.get(name) is not None for name in _SELECTORS[:3]):
            raise ApiError(400, "missing_selector", "give one of 'socket', 'user' or 'room'")
        try:
            for name in _SELECTORS[:3]:
                value = fields.get(name)
                if value is None:
                    continue
                if not isinstance(value, str) or not value:
                    raise SelectorError(f"{name}: must be a non-empty string")
                if name == "room":
                    operator = operator.to(value)
                elif name == "user":
                    operator = operator.user(value)
                else:
                    operator = operator.socket(value)
        except SelectorError as exc:
            raise ApiError(400, "invalid_selector", str(exc)) from None
        except ValueError as exc:  # a bad room name
            raise ApiError(400, "invalid_room", str(exc)) from None
        return operator

    async def _list(self, request: Request) -> tuple[int, dict[str, Any]]:
        operator = self._select(dict(request.query), required=True)
        found = await operator.fetch_sockets()
        return 200, {
            "sockets": [info.to_json() for info in found],
            "missing_instances": found.missing_instances,
        }

    async def _room(self, request: Request) -> tuple[int, dict[str, Any]]:
        room = urllib.parse.unquote(request.path.removeprefix("/api/v1/rooms/"))
        fields: dict[str, Any] = {"room": room, "namespace": request.query.get("namespace", MAIN)}
        count = await self._select(fields, required=True).count()
        return 200, {
            "room": room,
            "namespace": fields["namespace"],
            "sockets": count.sockets,
            "users": count.users,
            "missing_instances": count.missing_instances,
        }

    async def _act(self, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        operator = self._select(body, required=True)
        if action == "disconnect":
            reason = body.get("reason")
            if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
                raise ApiError(400, "invalid_reason", "reason must be a string of 200 characters")
            reach = await operator.disconnect_sockets(reason)
        else:
            rooms = body.get("rooms")
            if not isinstance(rooms, list) or not rooms:
                raise ApiError(400, "invalid_rooms", "rooms must be a non-empty list of rooms")
            try:
                if action == "join":
                    reach = await operator.sockets_join(rooms)
                else:
                    reach = await operator.sockets_leave(rooms)
            except SelectorError as exc:
                raise ApiError(400, "invalid_room", str(exc)) from None
        return 200, {"sockets": reach.sockets, "missing_instances": reach.missing_instances}

    async def _emit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        operator = self._select(body, required=True)
        event = body.get("event")
        try:
            check_event_name(event)
        except EventNameError as exc:
            raise ApiError(400, "invalid_event", str(exc)) from None
        if "data" not in body:
            raise ApiError(400, "invalid_body", "missing field 'data'")
        try:  # {"$binary": ...} is bytes here as in the publish API, before any schema check
            check_depth(body["data"], MAX_DATA_NESTING)
            body["data"] = decode_markers(body["data"])
        except BinaryMarkerError as exc:
            raise ApiError(400, "invalid_binary", str(exc)) from None
        except SocketIOError as exc:
            raise ApiError(400, "invalid_data", f"data: {exc}") from None
        if holds_placeholder(body["data"]):
            raise ApiError(400, "invalid_data", 'an object with "_placeholder": true is reserved')
        schema = self._schemas.get(str(event))
        issues = None if schema is None else schema.issues(body["data"])
        if issues is not None:
            self._metrics.invalid_payloads.labels("api_emit", str(event)).inc()
            error = InvalidPayloadError(str(event), issues)
            log.info("emit refused: %s", error)
            raise ApiError.invalid_payload(error)
        timeout_ms = body.get("timeout_ms", 5_000)
        if not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
            raise ApiError(400, "invalid_timeout", f"timeout_ms must be 1-{MAX_TIMEOUT_MS}")
        result = await operator.timeout(timeout_ms / 1000).emit_with_ack(str(event), body["data"])
        return 200, {
            "acks": [{"socket": sid, "response": response} for sid, response in result.acks],
            "missing": result.missing,
            "missing_instances": result.missing_instances,
        }

    async def _revoke_tokens(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        user, jti, exp = body.get("user"), body.get("jti"), body.get("exp")
        if user is not None:
            if not isinstance(user, str) or not user or jti is not None:
                raise ApiError(400, "invalid_revocation", "give {user} or {jti, exp}")
            reach = await self._revoke(user=user)
        else:
            if not isinstance(jti, str) or not jti:
                raise ApiError(400, "invalid_revocation", "give {user} or {jti, exp}")
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                raise ApiError(400, "invalid_revocation", "exp: the token's exp (Unix seconds)")
            reach = await self._revoke(jti=jti, exp=float(exp))
        return 200, {"sockets": reach.sockets, "missing_instances": reach.missing_instances}


def _method(request: Request, method: str) -> None:
    if request.method != method:
        raise ApiError(405, "method_not_allowed", f"use {method}")
