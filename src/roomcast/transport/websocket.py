"""WebSocket framing: the opening handshake answer, outgoing frames, incoming messages.

Incoming frames are parsed by the ``websockets`` library's sans-I/O protocol (masking, control
frames, size limits, the closing handshake); text messages are checked for UTF-8 here.
Outgoing data frames are built here, because a broadcast builds one frame and writes the same
bytes to every member.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable

from websockets.exceptions import ProtocolError as WSProtocolError
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side, State

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def _header(opcode: int, length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame (a server never masks)."""
    return _header(0x1, len(payload)) + payload


def binary_frame(payload: bytes) -> bytes:
    return _header(0x2, len(payload)) + payload


def _wire_size(length: int) -> int:
    """Bytes of a client frame carrying ``length`` payload bytes: a client always masks (four
    bytes of key), and no extension is negotiated, so the payload is sent as is."""
    if length < 126:
        return 6 + length
    return (8 if length < 65536 else 14) + length


MessageHandler = Callable[[str | bytes], None]


class WebSocketReader:
    """Turns received bytes into whole messages and tells what control bytes must be sent."""

    __slots__ = (
        "_fragment_size",
        "_fragments",
        "_max_size",
        "_opcode",
        "_protocol",
        "partial",
    )

    def __init__(self, max_size: int) -> None:
        self._protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=max_size)
        self._max_size = max_size
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._opcode: Opcode | None = None
        self.partial = 0
        """Bytes received that belong to a frame not yet complete (the last ones received)."""

    @property
    def fragmented(self) -> bool:
        """A fragmented message is half received."""
        return self._opcode is not None

    def receive(self, data: bytes, on_message: MessageHandler) -> bytes:
        """Feed bytes; call ``on_message`` per complete message; return bytes to write back.

        Raises :class:`WebSocketClosed` once the peer closed or broke the protocol.
        """
        proto = self._protocol
        proto.receive_data(data)
        partial = self.partial + len(data)
        for frame in proto.events_received():
            if not isinstance(frame, Frame):
                continue
            partial -= _wire_size(len(frame.data))
            opcode = frame.opcode
            if opcode in (Opcode.TEXT, Opcode.BINARY):
                if frame.fin:
                    if not self._deliver(opcode, bytes(frame.data), on_message):
                        break
                else:
                    self._opcode = opcode
                    self._fragments = [bytes(frame.data)]
                    self._fragment_size = len(frame.data)
            elif opcode is Opcode.CONT and self._opcode is not None:
                self._fragments.append(bytes(frame.data))
                self._fragment_size += len(frame.data)
                if self._fragment_size > self._max_size:
                    proto.fail(1009, "message too big")
                    break
                if frame.fin:
                    kind, self._opcode = self._opcode, None
                    message, self._fragments = b"".join(self._fragments), []
                    if not self._deliver(kind, message, on_message):
                        break
        self.partial = partial
        out = b"".join(proto.data_to_send())
        if proto.state is State.CLOSING or proto.state is State.CLOSED:
            raise WebSocketClosedError(out, self.close_reason())
        return out

    def close_reason(self) -> str:
        proto = self._protocol
        if isinstance(proto.parser_exc, WSProtocolError):
            return f"websocket protocol error: {proto.parser_exc}"
        sent = proto.close_sent
        if sent is not None and sent.code == 1009:
            return "websocket message too big"
        if sent is not None and sent.code == 1007:
            return f"websocket invalid data: {sent.reason}"
        rcvd = proto.close_rcvd
        if rcvd is not None:
            # the code goes after the colon: the part before it is a metric label, and a
            # client may send any of 65,536 codes
            return f"client closed websocket: code {rcvd.code}"
        return "websocket closed"

    def _deliver(self, opcode: Opcode, payload: bytes, on_message: MessageHandler) -> bool:
        """Hand one message over; False (and a 1007 close under way) for a text message that
        is not UTF-8, which the parser does not check."""
        if opcode is not Opcode.TEXT:
            on_message(payload)
            return True
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._protocol.fail(1007, f"text message is not utf-8 (byte {exc.start})")
            return False
        on_message(text)
        return True

    def close_frame(self, code: int, reason: str) -> bytes:
        return _header(0x8, 0) if code == 1005 else self._close_frame(code, reason)

    @staticmethod
    def _close_frame(code: int, reason: str) -> bytes:
        body = Close(code, reason[:120]).serialize()
        return _header(0x8, len(body)) + body


class WebSocketClosedError(Exception):
    """The WebSocket is closing; ``reply`` holds the bytes still to write (a close frame)."""

    def __init__(self, reply: bytes, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
