"""The one place where failures become wire responses.

- Engine.IO request refusals -> HTTP status + ``{"code": N, "message": "..."}`` (the codes
  Engine.IO clients know);
- API failures -> HTTP status + ``{"error": {"code": "...", "message": "..."}}``;
- Socket.IO connect refusals -> a CONNECT_ERROR packet
  ``{"message": "...", "data": {"code": ...}}``;
- room operations -> an ack ``{"ok": false, "error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import base64
import enum
from typing import Any

import orjson

from roomcast.schemas import InvalidPayloadError
from roomcast.transport.http import Exchange


class EngineErrorCode(enum.IntEnum):
    TRANSPORT_UNKNOWN = 0
    UNKNOWN_SID = 1
    BAD_HANDSHAKE_METHOD = 2
    BAD_REQUEST = 3
    FORBIDDEN = 4
    UNSUPPORTED_PROTOCOL_VERSION = 5


class EngineRequestError(Exception):
    def __init__(self, code: EngineErrorCode, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def engine_error_response(
    exchange: Exchange, error: EngineRequestError, headers: list[tuple[str, str]]
) -> None:
    body = orjson.dumps({"code": int(error.code), "message": error.message})
    exchange.respond(error.status, body, headers, content_type="application/json")


class ApiError(Exception):
    """A refused API request; ``code`` is a stable machine-readable label."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, str]] | None = None,
        *,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after_ms = retry_after_ms
        """With 429: when to retry (the body's ``retry_after_ms``, and ``Retry-After``)."""
        self.limit: str | None = None
        """With 429: the limit that refused (the body's ``limit``)."""

    @classmethod
    def rate_limited(cls, limit: str, retry_after_ms: int) -> ApiError:
        """429 ``rate_limited`` naming the limit, with when to retry."""
        error = cls(429, "rate_limited", f"over the {limit} rate limit, retry later")
        error.retry_after_ms = retry_after_ms
        error.limit = limit
        return error

    @classmethod
    def invalid_payload(cls, error: InvalidPayloadError) -> ApiError:
        """400 ``invalid_payload`` with the failing paths in ``details``."""
        return cls(400, error.code, str(error), error.detail_dicts())


def api_error_response(exchange: Exchange, error: ApiError) -> None:
    value: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.details is not None:
        value["details"] = error.details
    headers = [("WWW-Authenticate", "Bearer")] if error.status == 401 else []
    if error.limit is not None:
        value["limit"] = error.limit
    if error.retry_after_ms is not None:
        value["retry_after_ms"] = error.retry_after_ms
        headers.append(("Retry-After", str(max(1, -(-error.retry_after_ms // 1000)))))
    body = orjson.dumps({"error": value})
    exchange.respond(error.status, body, headers, content_type="application/json")


def json_response(exchange: Exchange, status: int, value: Any) -> None:
    """``value`` as JSON; bytes in it (a client's binary ack, say) as ``{"$binary": base64}``,
    the form the API reads."""
    body = orjson.dumps(value, default=_binary_json)
    exchange.respond(status, body, content_type="application/json")


def _binary_json(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$binary": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"type {type(value).__name__} is not JSON serializable")


def connect_error_payload(code: str, message: str) -> dict[str, Any]:
    """The CONNECT_ERROR data; the official client exposes ``err.message`` and ``err.data``."""
    return {"message": message, "data": {"code": code, "message": message}}


def ack_error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def ack_rate_limited(limit: str, retry_after_ms: int) -> dict[str, Any]:
    """The ack of an event over a rate limit (``roomcast.limits``)."""
    answer = ack_error("rate_limited", f"over the {limit} rate limit, retry later")
    answer["error"]["limit"] = limit
    answer["error"]["retry_after_ms"] = retry_after_ms
    return answer


def connect_rate_limited(limit: str, retry_after_ms: int, message: str) -> dict[str, Any]:
    """The CONNECT_ERROR data of a connect over a per-user limit (``roomcast.limits``)."""
    payload = connect_error_payload("rate_limited", message)
    payload["data"]["limit"] = limit
    payload["data"]["retry_after_ms"] = retry_after_ms
    return payload


def ack_invalid_payload(error: InvalidPayloadError) -> dict[str, Any]:
    """The ack of an event whose payload its schema refused: the failing paths in ``details``."""
    answer = ack_error(error.code, str(error))
    answer["error"]["details"] = error.detail_dicts()
    return answer


ACK_OK: dict[str, Any] = {"ok": True}
