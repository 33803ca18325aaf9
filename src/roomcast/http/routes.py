"""The HTTP application: Engine.IO endpoints, health, metrics and the publish API."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Container
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from roomcast.auth import InvalidRoomError, validate_room
from roomcast.broker.base import (
    BrokerError,
    BrokerUnavailableError,
    PublishRequest,
    PublishResult,
)
from roomcast.broker.envelope import MAX_DATA_NESTING, EnvelopeError
from roomcast.broker.topics import MAIN, InvalidNamespaceError, validate_namespace
from roomcast.http import peers
from roomcast.http.access import Access, Listener, Route
from roomcast.http.errors import ApiError, api_error_response, json_response
from roomcast.http.server_api import ServerApiRoutes
from roomcast.jsonbytes import BinaryMarkerError, decode_markers, may_hold_markers
from roomcast.limits import Rate, Refusals
from roomcast.protocol.errors import EventNameError, SocketIOError
from roomcast.protocol.socketio import check_depth, check_event_name, holds_placeholder
from roomcast.schemas import InvalidPayloadError
from roomcast.transport.http import Exchange, HttpHandler, Request

if TYPE_CHECKING:
    from roomcast.metrics import Metrics
    from roomcast.tasks import TaskSet

log = logging.getLogger("roomcast.api")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

Publish = Callable[[PublishRequest], Awaitable[PublishResult]]
_PUBLISH_FIELDS = frozenset(
    {"room", "namespace", "event", "data", "idempotency_key", "traceparent"}
)


class _ListenerView:
    """The router as one listener sees it (an :class:`HttpHandler`)."""

    __slots__ = ("_listener", "_router")

    def __init__(self, router: Router, listener: Listener) -> None:
        self._router = router
        self._listener = listener

    def handle(self, request: Request, exchange: Exchange) -> None:
        self._router.route(self._listener, request, exchange)


class Router:
    """Dispatches by path and listener; every other HTTP concern lives in the handlers it
    names. ``handle`` is the public listener's view; ``ops`` and ``peer`` are the others'."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        tasks: TaskSet,
        publish: Publish,
        api_key: str,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        max_payload: int,
        worker: str = "",
        peer_sockets: dict[str, str] | None = None,
        namespaces: Container[str] = ("/",),
        access: Access | None = None,
        api_rate: Rate | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        """With ``--workers``: ``worker`` names this worker (``"00"``), ``peer_sockets`` maps the
        others' names to their peer unix sockets, and ``/metrics`` and ``/readyz`` answer for
        all. ``access`` says which listener serves what (default: everything public, no key).
        ``api_rate``: publish requests per API key (there is one key), counted by ``refusals``."""
        self.engines: dict[str, HttpHandler] = {}
        self._metrics = metrics
        self._tasks = tasks
        self._publish = publish
        self._api_key = api_key.encode()
        self._readiness = readiness
        self._max_payload = max_payload
        self._worker = worker
        self._peers = peer_sockets or {}
        self._namespaces = namespaces
        """The namespaces the application defines (publications to others are refused)."""
        self.server_api: ServerApiRoutes | None = None
        """The server API routes (set by the node once it has a cluster)."""
        self._access = access or Access()
        self._api_bucket = api_rate.bucket() if api_rate is not None else None
        self._refusals = refusals
        self.ops: HttpHandler = _ListenerView(self, Listener.OPS)
        self.peer: HttpHandler = _ListenerView(self, Listener.PEER)

    def mount(self, path: str, handler: HttpHandler) -> None:
        self.engines[path.rstrip("/") + "/"] = handler

    def handle(self, request: Request, exchange: Exchange) -> None:
        self.route(Listener.PUBLIC, request, exchange)

    def route(self, listener: Listener, request: Request, exchange: Exchange) -> None:
        path = request.path
        serves = self._access.serves
        engine = self.engines.get(path if path.endswith("/") else path + "/")
        if engine is not None and serves(listener, Route.ENGINE):
            engine.handle(request, exchange)
        elif path == "/healthz":
            json_response(exchange, 200, {"status": "ok"})
        elif path == "/readyz":
            if self._for_instance(request):
                self._tasks.spawn(self._instance_readiness(exchange), name="readyz")
            else:
                ready, detail = self._readiness()
                json_response(exchange, 200 if ready else 503, {"ready": ready, **detail})
        elif path == "/metrics" and serves(listener, Route.METRICS):
            refusal = self._access.metrics_key_refusal(
                listener, request.headers.get("authorization", "")
            )
            if refusal is not None:
                api_error_response(exchange, ApiError(401, "unauthorized", refusal))
            elif self._for_instance(request):
                self._tasks.spawn(self._instance_metrics(exchange), name="metrics")
            else:
                body = generate_latest(self._metrics.registry)
                exchange.respond(200, body, [], CONTENT_TYPE_LATEST)
        elif path == "/api/v1/publish" and serves(listener, Route.API):
            self._publish_api(request, exchange)
        elif (
            self.server_api is not None
            and self.server_api.serves(path)
            and serves(listener, Route.API)
        ):
            self.server_api.handle(request, exchange)
        else:
            api_error_response(exchange, ApiError(404, "not_found", f"no route for {path[:80]}"))

    # -- several workers: /metrics and /readyz for the whole instance ------------------------------
    def _for_instance(self, request: Request) -> bool:
        return bool(self._peers) and request.query.get("scope") != peers.WORKER_SCOPE

    async def _instance_metrics(self, exchange: Exchange) -> None:
        try:
            own = generate_latest(self._metrics.registry)
            target = f"/metrics?scope={peers.WORKER_SCOPE}"
            answers = await peers.gather((self._worker, 200, own), self._peers, target)
            for name, status, body, _ in answers:
                if body is not None and status != 200:
                    log.warning(
                        "worker %s answered %s with %d; counted as down", name, target, status
                    )
            views = [(name, body if status == 200 else None) for name, status, body, _ in answers]
            merged = peers.merge_metrics(views)
        except Exception:  # task boundary: the scraper must get an answer, never a hang
            log.exception("merging the workers' metrics failed")
            api_error_response(exchange, ApiError(500, "internal_error", "metrics failed"))
            return
        if not exchange.aborted:
            exchange.respond(200, merged, [], CONTENT_TYPE_LATEST)

    async def _instance_readiness(self, exchange: Exchange) -> None:
        try:
            ready, detail = self._readiness()
            own = orjson.dumps({"ready": ready, **detail})
            target = f"/readyz?scope={peers.WORKER_SCOPE}"
            answers = await peers.gather(
                (self._worker, 200 if ready else 503, own), self._peers, target
            )
            all_ready, merged = peers.merge_readiness(answers)
        except Exception:  # task boundary: the probe must get an answer, never a hang
            log.exception("merging the workers' readiness failed")
            api_error_response(exchange, ApiError(500, "internal_error", "readiness failed"))
            return
        if not exchange.aborted:
            json_response(exchange, 200 if all_ready else 503, {"ready": all_ready, **merged})

    # -- POST /api/v1/publish ---------------------------------------------------------------
    def _publish_api(self, request: Request, exchange: Exchange) -> None:
        try:
            if request.method != "POST":
                raise ApiError(405, "method_not_allowed", "use POST")
            self.check_key(request)
            bucket = self._api_bucket
            if bucket is not None and not bucket.take():
                if self._refusals is not None:
                    self._refusals.refused("api", "publish API")
                raise ApiError.rate_limited("api", bucket.retry_after_ms())
            publish = parse_publish_body(request.body, self._max_payload)
            if publish.traceparent is None and "traceparent" in request.headers:
                traceparent = header_traceparent(request.headers["traceparent"])
                if traceparent is not None:
                    publish = dataclasses.replace(publish, traceparent=traceparent)
            if publish.namespace not in self._namespaces:
                raise ApiError(
                    400,
                    "unknown_namespace",
                    f"namespace {publish.namespace!r} is not defined by the application",
                )
        except ApiError as error:
            api_error_response(exchange, error)
            return
        self._tasks.spawn(self._do_publish(publish, exchange), name="api-publish")

    def check_key(self, request: Request) -> None:
        """Raise a 401 :class:`ApiError` unless the request carries the API key."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <api key>")
        if not self._api_key or not hmac.compare_digest(key.strip().encode(), self._api_key):
            raise ApiError(401, "unauthorized", "invalid api key")

    async def _do_publish(self, request: PublishRequest, exchange: Exchange) -> None:
        try:
            result = await self._publish(request)
        except EnvelopeError as exc:  # data no stream entry can hold
            self._metrics.dropped.labels("invalid_payload").inc()
            log.info("publish to %s refused: %s", request.room, exc, extra=_context(request))
            api_error_response(exchange, ApiError(400, "invalid_data", str(exc)))
            return
        except InvalidPayloadError as exc:
            self._metrics.invalid_payloads.labels("api_publish", request.event).inc()
            log.info("publish to %s refused: %s", request.room, exc, extra=_context(request))
            api_error_response(exchange, ApiError.invalid_payload(exc))
            return
        except BrokerUnavailableError as exc:
            self._metrics.dropped.labels("broker_unavailable").inc()
            log.warning("publish to %s refused: %s", request.room, exc, extra=_context(request))
            api_error_response(exchange, ApiError(503, "broker_unavailable", str(exc)))
            return
        except BrokerError as exc:  # refused by Redis itself: a retry would not help
            self._metrics.dropped.labels("broker_refused").inc()
            log.error(
                "publish to %s refused by the broker: %s",
                request.room,
                exc,
                extra=_context(request),
            )
            api_error_response(exchange, ApiError(502, "broker_refused", str(exc)))
            return
        except Exception:  # task boundary: the publisher must get an answer, never a hang
            self._metrics.dropped.labels("publish_failed").inc()
            log.exception("publish to %s failed", request.room, extra=_context(request))
            api_error_response(exchange, ApiError(500, "internal_error", "publish failed"))
            return
        self._metrics.published.labels("http").inc()
        body: dict[str, Any] = {"id": result.id, "offset": result.offset, "room": request.room}
        if request.namespace != MAIN:
            body["namespace"] = request.namespace
        if result.duplicate:
            body["duplicate"] = True
        if not exchange.aborted:
            json_response(exchange, 200 if result.duplicate else 202, body)


def header_traceparent(value: str) -> str | None:
    """A W3C ``traceparent`` header's value, or None (logged) when it is not a valid one: as
    the W3C recommendation asks, a bad header is ignored (the publication starts no trace
    from it), never a reason to refuse the publication. A ``traceparent`` body field wins."""
    value = value.strip()
    if (
        _TRACEPARENT.fullmatch(value) is None
        or value.startswith("ff")
        or value[3:35] == "0" * 32
        or value[36:52] == "0" * 16
    ):
        log.info("ignored an invalid traceparent header: %r", value[:80])
        return None
    return value


def parse_publish_body(body: bytes, max_payload: int) -> PublishRequest:
    """Validate ``{"room", "event", "data", "idempotency_key"?}``; errors name the field.

    In ``data``, ``{"$binary": "<base64>"}`` stands for bytes (:mod:`roomcast.jsonbytes`)."""
    if len(body) > max_payload:
        raise ApiError(413, "payload_too_large", f"body of {len(body)} bytes exceeds {max_payload}")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"body is not valid json: {exc}") from exc
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_body", "body must be a json object")
    unknown = sorted(set(value) - _PUBLISH_FIELDS)
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field {unknown[0]!r}")
    try:
        room = validate_room(value.get("room"))
    except InvalidRoomError as error:
        raise ApiError(400, "invalid_room", str(error)) from error
    event = value.get("event")
    if not isinstance(event, str) or not 1 <= len(event) <= 128:
        raise ApiError(400, "invalid_event", "event must be a string of 1-128 characters")
    if "data" not in value:
        raise ApiError(400, "invalid_body", "missing field 'data'")
    key = value.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 256):
        raise ApiError(400, "invalid_idempotency_key", "idempotency_key must be 1-256 characters")
    traceparent = value.get("traceparent")
    if traceparent is not None and (
        not isinstance(traceparent, str) or not _TRACEPARENT.fullmatch(traceparent)
    ):
        raise ApiError(400, "invalid_traceparent", "traceparent must be a w3c traceparent")
    try:
        check_event_name(event)
    except EventNameError as exc:
        raise ApiError(400, "invalid_event", str(exc)) from None
    try:
        namespace = validate_namespace(value.get("namespace", MAIN))
    except InvalidNamespaceError as exc:
        raise ApiError(400, "invalid_namespace", str(exc)) from None
    data = value["data"]
    try:
        check_depth(data, MAX_DATA_NESTING)
    except SocketIOError as exc:
        raise ApiError(400, "invalid_data", f"data: {exc}") from None
    if may_hold_markers(body):
        try:
            data = decode_markers(data)
        except BinaryMarkerError as exc:
            raise ApiError(400, "invalid_binary", str(exc)) from None
        if b'"_placeholder"' in body and holds_placeholder(data):
            # Beside bytes, clients would take such an object for an attachment; refused
            # whether or not this request holds bytes (it is rare, and cheap to tell apart).
            raise ApiError(400, "invalid_data", 'an object with "_placeholder": true is reserved')
    return PublishRequest(
        room=room,
        namespace=namespace,
        event=event,
        data=data,
        idempotency_key=key,
        traceparent=traceparent,
    )


def _context(request: PublishRequest) -> dict[str, str]:
    """The context fields of a log line about ``request`` (``roomcast.logs``)."""
    return {"room": request.room, "namespace": request.namespace}
