"""``socket.io-msgpack-parser``'s wire format (sans-I/O; the ``msgpack`` package encodes).

Each Socket.IO packet is one binary Engine.IO message: a msgpack map
``{"type": 0-4, "nsp": "/...", "data": ..., "id": N}``, where ``data`` and ``id`` are left out
when absent.  Binary values stay inline as msgpack ``bin``, so there are no binary packet
types and no attachments.  The client encodes with ``notepack.io``, which writes a Node
``Buffer`` as ``bin``, an ``ArrayBuffer`` or typed array (browsers) as ext type 0 and
``undefined`` as the 1-byte ext type 0 ``00``; a ``Date`` is the 8-byte ext type 0.  The
decoder turns ext type 0 into ``bytes``, except that one zero byte is ``undefined`` (``None``):
the two are the same bytes to any msgpack reader that sees only an ext's type and data, as
``msgpack`` does (a browser's 1-byte ``ArrayBuffer`` holding ``00`` arrives as ``None``, and a
``Date`` as its 8 bytes).

Packets are checked as the official parser checks them (type, namespace, payload shape, ack
id; a ``null`` data counts as absent, as ``undefined`` does), and with the same
:class:`~roomcast.protocol.socketio.Limits` as the JSON parser: nesting depth, and at most
``max_attachments`` binary values.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgpack

from roomcast.protocol.errors import (
    NestingTooDeepError,
    SocketIOError,
    TooManyAttachmentsError,
)
from roomcast.protocol.socketio import (
    MAX_ACK_ID,
    RESERVED_EVENTS,
    Limits,
    Packet,
    PacketType,
)

__all__ = ["MSGPACK_PARSER", "MsgpackDecoder", "MsgpackParser"]


class InvalidMsgpackError(SocketIOError):
    reason = "invalid_msgpack"


_WIRE_TYPE: Final = {
    PacketType.CONNECT: 0,
    PacketType.DISCONNECT: 1,
    PacketType.EVENT: 2,
    PacketType.ACK: 3,
    PacketType.CONNECT_ERROR: 4,
    PacketType.BINARY_EVENT: 2,
    PacketType.BINARY_ACK: 3,
}
"""Binary values are inline: the binary packet types of the JSON parser do not exist here."""

_UNDEFINED: Final = b"\x00"


def _ext(code: int, data: bytes) -> Any:
    if code != 0:
        raise InvalidMsgpackError(f"unsupported msgpack ext type {code}")
    if data == _UNDEFINED:
        return None  # notepack.io's undefined
    return data  # an ArrayBuffer or typed array


class MsgpackDecoder:
    """Decodes one packet per binary message (``feed`` never waits for more)."""

    __slots__ = ("_limits",)

    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    @property
    def idle(self) -> bool:
        """Always: a packet is never split over messages."""
        return True

    def feed(self, message: str | bytes) -> Packet:
        if not isinstance(message, bytes):
            raise InvalidMsgpackError("text message: the msgpack parser expects binary messages")
        try:
            value = msgpack.unpackb(message, raw=False, strict_map_key=True, ext_hook=_ext)
        except InvalidMsgpackError:
            raise
        except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
            raise InvalidMsgpackError(f"invalid msgpack: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidMsgpackError("packet is not a msgpack map")
        kind = value.get("type")
        if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 4:
            raise SocketIOError(f"invalid packet type {str(kind)[:20]!r}")
        packet_type = PacketType(kind)
        namespace = value.get("nsp")
        if not isinstance(namespace, str) or not namespace.startswith("/"):
            raise SocketIOError("invalid namespace")
        ack_id = value.get("id")
        if ack_id is not None and (
            isinstance(ack_id, bool) or not isinstance(ack_id, int) or not 0 <= ack_id <= MAX_ACK_ID
        ):
            raise SocketIOError(f"invalid ack id {str(ack_id)[:20]!r}")
        data = value.get("data")
        _check(data, self._limits)
        if not _valid_payload(packet_type, data):
            raise SocketIOError(f"invalid payload for {packet_type.name} packet")
        if packet_type is PacketType.ACK and ack_id is None:
            raise SocketIOError("ack packet without an ack id")
        return Packet(packet_type, namespace, data, ack_id)


def _valid_payload(kind: PacketType, payload: Any) -> bool:
    if kind is PacketType.CONNECT:
        return payload is None or isinstance(payload, dict)
    if kind is PacketType.DISCONNECT:
        return payload is None
    if kind is PacketType.CONNECT_ERROR:
        return isinstance(payload, dict | str)
    if not isinstance(payload, list):
        return False
    if kind is PacketType.EVENT:
        if not payload:
            return False
        name = payload[0]
        if isinstance(name, bool):
            return False
        return isinstance(name, int) or (isinstance(name, str) and name not in RESERVED_EVENTS)
    return True


_SCALARS: Final = (str, int, float, bool, type(None))


def _check(value: Any, limits: Limits) -> None:
    """Only what JSON has, plus ``bytes``: string keys, the nesting and binary limits."""
    binaries = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            # JSON has no NaN or Infinity: a client of the JSON parser cannot send them, and
            # what follows (schemas, orjson) must never see one.
            raise InvalidMsgpackError("NaN and Infinity are not JSON numbers")
        if isinstance(item, _SCALARS):
            continue
        if isinstance(item, bytes):
            binaries += 1
            if binaries > limits.max_attachments:
                raise TooManyAttachmentsError(
                    f"more than {limits.max_attachments} binary values in one packet"
                )
            continue
        if depth > limits.max_nesting:
            raise NestingTooDeepError(f"payload nesting exceeds {limits.max_nesting} levels")
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            if item.get("_placeholder") is True:
                # Reserved: JSON-parser clients would take it for a binary attachment.
                raise InvalidMsgpackError('an object with "_placeholder": true is reserved')
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidMsgpackError("map keys must be strings")
                stack.append((child, depth + 1))
        else:  # a msgpack Timestamp (ext type -1): not something a Socket.IO client sends
            raise InvalidMsgpackError(f"unsupported msgpack value {type(item).__name__}")


class MsgpackParser:
    """``socket.io-msgpack-parser``: one msgpack map per packet, binary inline."""

    name = "msgpack"

    __slots__ = ("_packer",)

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    def encode(self, packet: Packet) -> list[str | bytes]:
        body: dict[str, Any] = {"type": _WIRE_TYPE[packet.type], "nsp": packet.namespace}
        if packet.data is not None:
            body["data"] = packet.data
        if packet.id is not None:
            body["id"] = packet.id
        encoded: bytes = self._packer.pack(body)
        return [encoded]

    def decoder(self, limits: Limits) -> MsgpackDecoder:
        return MsgpackDecoder(limits)


MSGPACK_PARSER: Final = MsgpackParser()
