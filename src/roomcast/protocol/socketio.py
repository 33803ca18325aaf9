"""Socket.IO v5 packets and the default (JSON) parser (sans-I/O; orjson is the only non-stdlib
import, for speed).

Encoding: ``<type>[<attachments>-][<namespace>,][<ack id>][<JSON payload>]``.  Binary events and
acks replace each ``bytes`` value with ``{"_placeholder": true, "num": N}`` and send the
attachments as separate binary Engine.IO messages after the text packet.  The other parser,
``socket.io-msgpack-parser``'s, is in :mod:`roomcast.protocol.msgpack_parser`; both satisfy
:class:`roomcast.protocol.parser.Parser`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from roomcast.protocol.errors import (
    EventNameError,
    InvalidJSONError,
    NestingTooDeepError,
    SocketIOError,
    TooManyAttachmentsError,
)

RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
)
MAX_ACK_ID = 2**53 - 1
GATEWAY_EVENT_PREFIX = "roomcast:"
"""Events the gateway itself sends clients (``roomcast:disconnect``); nobody else may."""
MAX_EVENT_NAME = 128


def check_event_name(name: object) -> str:
    """Return ``name`` if a service or client may publish an event by that name to clients;
    else raise :class:`EventNameError` saying why.  Every publish path calls this: the HTTP
    API, a client's ``publish``, the Python publisher and entries read from Redis."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_EVENT_NAME:
        raise EventNameError(f"event name must be 1-{MAX_EVENT_NAME} characters")
    if name in RESERVED_EVENTS:
        raise EventNameError(f"event name {name!r} is reserved by socket.io")
    if name.startswith(GATEWAY_EVENT_PREFIX):
        raise EventNameError(f"event name {name[:40]!r} is reserved for the gateway")
    return name


class PacketType(enum.IntEnum):
    CONNECT = 0
    DISCONNECT = 1
    EVENT = 2
    ACK = 3
    CONNECT_ERROR = 4
    BINARY_EVENT = 5
    BINARY_ACK = 6


_BINARY = (PacketType.BINARY_EVENT, PacketType.BINARY_ACK)


@dataclass(frozen=True, slots=True)
class Limits:
    """Explicit security limits of the decoder."""

    max_attachments: int = 10
    max_nesting: int = 32


@dataclass(slots=True)
class Packet:
    type: PacketType
    namespace: str = "/"
    data: Any = None
    id: int | None = None
    attachments: list[bytes] = field(default_factory=list)

    def serialize(self) -> list[str | bytes]:
        """The Engine.IO message payloads: one text packet, then any binary attachments."""
        attachments: list[bytes] = []
        body = b""
        if self.data is not None:
            body = dumps_binary(self.data, attachments)
        kind = self.type
        if attachments and kind is PacketType.EVENT:
            kind = PacketType.BINARY_EVENT
        elif attachments and kind is PacketType.ACK:
            kind = PacketType.BINARY_ACK
        head = str(kind.value)
        if kind in _BINARY:
            head += f"{len(attachments)}-"
        if self.namespace != "/":
            head += self.namespace + ","
        if self.id is not None:
            head += str(self.id)
        out: list[str | bytes] = [head + body.decode("utf-8")]
        out.extend(attachments)
        return out


class PlaceholderError(ValueError):
    """Binary data that also holds an object with ``"_placeholder": true`` of its own: a
    client's parser would take that object for an attachment (and fail on it)."""


def holds_placeholder(value: Any) -> bool:
    """Whether ``value`` holds an object with ``"_placeholder": true`` anywhere: what
    socket.io-parser takes for an attachment in a binary packet, whatever its other keys."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("_placeholder") is True:
                return True
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def dumps_binary(data: Any, attachments: list[bytes]) -> bytes:
    """``data`` as JSON, each ``bytes`` (``bytearray``, ``memoryview``) value replaced by a
    placeholder ``{"_placeholder": true, "num": N}`` and appended to ``attachments``; raise
    :class:`PlaceholderError` if ``data`` holds a placeholder-like object of its own."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            attachments.append(bytes(obj))
            return {"_placeholder": True, "num": len(attachments) - 1}
        raise TypeError(f"cannot encode {type(obj).__name__}")

    text = orjson.dumps(data, default=default)
    if attachments and holds_placeholder(data):
        raise PlaceholderError(
            'data: an object with "_placeholder": true beside bytes would be taken for an '
            "attachment by the clients"
        )
    return text


def encode_event_prefix(namespace: str) -> str:
    """``42`` or ``42/ns,``: what precedes the JSON array of an event without ack."""
    return "42" if namespace == "/" else f"42{namespace},"


def check_depth(value: Any, limit: int) -> None:
    """Raise :class:`NestingTooDeepError` if ``value`` nests lists and objects deeper than
    ``limit`` (what the API and stored entries are held to, as client packets are)."""
    _check_depth(value, limit)


def _check_depth(value: Any, limit: int) -> None:
    if not isinstance(value, (list, dict)):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # only containers are pushed: scalars cost one isinstance each
        item, depth = stack.pop()
        if depth > limit:
            raise NestingTooDeepError(f"payload nesting exceeds {limit} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))


def _valid_payload(kind: PacketType, payload: Any) -> bool:
    if kind is PacketType.CONNECT:
        return payload is None or isinstance(payload, dict)
    if kind is PacketType.DISCONNECT:
        return payload is None
    if kind is PacketType.CONNECT_ERROR:
        return isinstance(payload, (dict, str))
    if kind in (PacketType.EVENT, PacketType.BINARY_EVENT):
        if not isinstance(payload, list) or not payload:
            return False
        name = payload[0]
        if isinstance(name, bool):
            return False
        return isinstance(name, int) or (isinstance(name, str) and name not in RESERVED_EVENTS)
    return isinstance(payload, list)


def parse_text(text: str, limits: Limits) -> Packet:
    """Parse the text part of a Socket.IO packet.  Binary packets come back with
    ``attachments`` still empty and their expected count in ``id``-independent state: see
    :class:`Decoder`."""
    packet, _ = _parse(text, limits)
    return packet


def _parse(text: str, limits: Limits) -> tuple[Packet, int]:
    if not text:
        raise SocketIOError("empty packet")
    digit = text[0]
    if digit not in "0123456":
        raise SocketIOError(f"unknown packet type {digit!r}")
    kind = PacketType(int(digit))
    i = 1
    n = len(text)
    expected = 0
    if kind in _BINARY:
        dash = text.find("-", i)
        count = text[i:dash] if dash != -1 else ""
        if not count.isdigit() or not count.isascii():
            raise SocketIOError("invalid attachment count")
        if len(count) > len(str(limits.max_attachments)):  # before int(): it caps at 4300 digits
            raise TooManyAttachmentsError(
                f"{count[:20]}... attachments exceed the limit of {limits.max_attachments}"
            )
        expected = int(count)
        if expected > limits.max_attachments:
            raise TooManyAttachmentsError(
                f"{expected} attachments exceed the limit of {limits.max_attachments}"
            )
        i = dash + 1
    namespace = "/"
    if i < n and text[i] == "/":
        comma = text.find(",", i)
        end = n if comma == -1 else comma
        namespace = text[i:end]
        i = end + 1 if comma != -1 else n
    start = i
    while i < n and "0" <= text[i] <= "9":
        i += 1
    ack_id: int | None = None
    if i > start:
        if i - start > len(str(MAX_ACK_ID)):  # before int(): it refuses over 4300 digits
            raise SocketIOError(f"ack id {text[start : start + 20]}... out of range")
        ack_id = int(text[start:i])
        if ack_id > MAX_ACK_ID:
            raise SocketIOError(f"ack id {text[start:i][:20]} out of range")
    payload: Any = None
    if i < n:
        try:
            payload = orjson.loads(text[i:])
        except orjson.JSONDecodeError as exc:
            raise InvalidJSONError(f"invalid json payload: {exc}") from exc
        _check_depth(payload, limits.max_nesting)
    if not _valid_payload(kind, payload):
        raise SocketIOError(f"invalid payload for {kind.name} packet")
    if kind in (PacketType.ACK, PacketType.BINARY_ACK) and ack_id is None:
        raise SocketIOError("ack packet without an ack id")
    return Packet(kind, namespace, payload, ack_id), expected


def reconstruct(value: Any, attachments: list[bytes]) -> Any:
    """``value`` with every placeholder replaced by its attachment; raise
    :class:`SocketIOError` for a placeholder that names none."""
    if isinstance(value, list):
        return [reconstruct(v, attachments) for v in value]
    if isinstance(value, dict):
        if value.get("_placeholder") is True:  # socket.io-parser's own rule: other keys or not
            num = value.get("num")
            if (
                len(value) == 2
                and isinstance(num, int)
                and not isinstance(num, bool)
                and 0 <= num < len(attachments)
            ):
                return attachments[num]
            raise SocketIOError(f"invalid attachment placeholder {str(value)[:60]}")
        return {k: reconstruct(v, attachments) for k, v in value.items()}
    return value


class Decoder:
    """Reassembles packets from Engine.IO messages, binary attachments included.

    ``feed()`` returns a complete packet, or ``None`` while attachments are still expected.
    """

    __slots__ = ("_expected", "_limits", "_pending")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._pending: Packet | None = None
        self._expected = 0

    @property
    def idle(self) -> bool:
        """No binary packet is waiting for attachments."""
        return self._pending is None

    def feed(self, message: str | bytes) -> Packet | None:
        if isinstance(message, bytes):
            pending = self._pending
            if pending is None:
                raise SocketIOError("unexpected binary attachment")
            pending.attachments.append(message)
            if len(pending.attachments) < self._expected:
                return None
            self._pending = None
            pending.data = reconstruct(pending.data, pending.attachments)
            return pending
        if self._pending is not None:
            raise SocketIOError("text packet received while waiting for attachments")
        packet, expected = _parse(message, self._limits)
        if expected == 0:
            if packet.type in _BINARY:
                packet.data = reconstruct(packet.data, [])
            return packet
        self._pending = packet
        self._expected = expected
        return None


class JsonParser:
    """Socket.IO's default parser: text packets, binary attachments as extra messages."""

    name = "json"

    def encode(self, packet: Packet) -> list[str | bytes]:
        return packet.serialize()

    def decoder(self, limits: Limits) -> Decoder:
        return Decoder(limits)


JSON_PARSER: Final = JsonParser()
