"""The one place where failures become wire responses.

- Engine.IO request refusals -> HTTP status + ``{"code": N, "message": "..."}`` (the codes
  Engine.IO clients know);
- API failures -> HTTP status + ``{"error": {"code": "...", "message": "..."}}``;
- Socket.IO connect refusals -> a CONNECT_ERROR packet
  ``{"message": "...", "data": {"code": ...}}``;
- room operations -> an ack ``{"ok": false, "error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

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
        self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    @classmethod
    def invalid_payload(cls, error: InvalidPayloadError) -> ApiError:
        """400 ``invalid_payload`` with the failing paths in ``details``."""
        return cls(400, error.code, str(error), error.detail_dicts())


def api_error_response(exchange: Exchange, error: ApiError) -> None:
    value: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.details is not None:
        value["details"] = error.details
    body = orjson.dumps({"error": value})
    headers = [("WWW-Authenticate", "Bearer")] if error.status == 401 else []
    exchange.respond(error.status, body, headers, content_type="application/json")


def json_response(exchange: Exchange, status: int, value: Any) -> None:
    exchange.respond(status, orjson.dumps(value), content_type="application/json")


def connect_error_payload(code: str, message: str) -> dict[str, Any]:
    """The CONNECT_ERROR data; the official client exposes ``err.message`` and ``err.data``."""
    return {"message": message, "data": {"code": code, "message": message}}


def ack_error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def ack_invalid_payload(error: InvalidPayloadError) -> dict[str, Any]:
    """The ack of an event whose payload its schema refused: the failing paths in ``details``."""
    answer = ack_error(error.code, str(error))
    answer["error"]["details"] = error.detail_dicts()
    return answer


ACK_OK: dict[str, Any] = {"ok": True}
