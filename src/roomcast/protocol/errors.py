"""One exception tree for every protocol violation."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Input that breaks the Engine.IO or Socket.IO protocol; the message names what was wrong."""

    reason: str = "protocol_error"
    """A short, stable label used for metrics."""


class EngineIOError(ProtocolError):
    reason = "invalid_engineio_packet"


class SocketIOError(ProtocolError):
    reason = "invalid_socketio_packet"


class PayloadTooLargeError(ProtocolError):
    reason = "payload_too_large"


class TooManyAttachmentsError(SocketIOError):
    reason = "too_many_attachments"


class NestingTooDeepError(SocketIOError):
    reason = "nesting_too_deep"


class InvalidJSONError(SocketIOError):
    reason = "invalid_json"


class EventNameError(SocketIOError):
    """An event name that may not be published to clients (reserved, or too long)."""

    reason = "invalid_event"
