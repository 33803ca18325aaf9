"""Engine.IO v4 packets and HTTP long-polling payloads (sans-I/O, standard library only).

A packet is a type digit followed by its data.  Over WebSocket a text frame carries one text
packet and a binary frame carries one binary *message* packet.  Over polling, packets are joined
by the record separator ``\\x1e`` and a binary packet is ``b`` followed by base64.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass

from roomcast.protocol.errors import EngineIOError, PayloadTooLargeError

SEPARATOR = "\x1e"


class PacketType(enum.IntEnum):
    OPEN = 0
    CLOSE = 1
    PING = 2
    PONG = 3
    MESSAGE = 4
    UPGRADE = 5
    NOOP = 6


_TYPES = {str(t.value): t for t in PacketType}


@dataclass(frozen=True, slots=True)
class Packet:
    type: PacketType
    data: str | bytes = ""

    @classmethod
    def parse(cls, raw: str | bytes) -> Packet:
        """Parse one packet as received over WebSocket: text is typed, bytes are a message."""
        if isinstance(raw, bytes):
            return cls(PacketType.MESSAGE, raw)
        if not raw:
            raise EngineIOError("empty packet")
        kind = _TYPES.get(raw[0])
        if kind is None:
            raise EngineIOError(f"unknown packet type {raw[0]!r}")
        return cls(kind, raw[1:])

    def serialize(self) -> str | bytes:
        """The WebSocket form: bytes for a binary message, else the type digit and the text."""
        if isinstance(self.data, bytes):
            return self.data
        return f"{self.type.value}{self.data}"


def encode_payload(packets: list[str | bytes]) -> str:
    """Join already-serialized WebSocket forms into one polling payload."""
    parts = [
        "b" + base64.b64encode(p).decode("ascii") if isinstance(p, bytes) else p for p in packets
    ]
    return SEPARATOR.join(parts)


def split_payload(text: str) -> list[tuple[bool, bytes]]:
    """``(binary, payload)`` for each packet of a polling payload that this server encoded
    itself, in its WebSocket form: the decoded bytes of a binary packet (``b`` and base64),
    the UTF-8 text of any other."""
    out: list[tuple[bool, bytes]] = []
    for part in text.split(SEPARATOR):
        if part.startswith("b"):
            out.append((True, base64.b64decode(part[1:])))
        else:
            out.append((False, part.encode("utf-8")))
    return out


def decode_payload(body: bytes, *, max_payload: int) -> list[Packet]:
    """Split a polling POST body into packets; raise on any malformed one."""
    if len(body) > max_payload:
        raise PayloadTooLargeError(f"payload of {len(body)} bytes exceeds {max_payload}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EngineIOError(f"payload is not valid utf-8 at byte {exc.start}") from exc
    packets: list[Packet] = []
    for part in text.split(SEPARATOR):
        if part.startswith("b"):
            try:
                data = base64.b64decode(part[1:], validate=True)
            except ValueError as exc:  # binascii.Error, or a non-ASCII character
                raise EngineIOError("invalid base64 in binary packet") from exc
            packets.append(Packet(PacketType.MESSAGE, data))
        else:
            packets.append(Packet.parse(part))
    return packets
