"""The Socket.IO parser a server speaks: how packets become Engine.IO messages and back.

Socket.IO lets both ends swap the packet codec; a client and its server must use the same one.
Roomcast offers the default JSON parser (:mod:`roomcast.protocol.socketio`) and
``socket.io-msgpack-parser``'s (:mod:`roomcast.protocol.msgpack_parser`), chosen once per
server by the ``parser`` setting.  Both are sans-I/O: ``encode`` turns a packet into the
messages to send, and a decoder turns received messages back into packets.
"""

from __future__ import annotations

from typing import Final, Protocol

from roomcast.protocol.msgpack_parser import MSGPACK_PARSER
from roomcast.protocol.socketio import JSON_PARSER, Limits, Packet

__all__ = ["PARSERS", "PacketDecoder", "Parser", "parser_named"]


class PacketDecoder(Protocol):
    """Reassembles packets from Engine.IO messages."""

    @property
    def idle(self) -> bool:
        """No packet is half received (waiting for binary attachments)."""
        ...

    def feed(self, message: str | bytes) -> Packet | None:
        """A complete packet, or ``None`` while more messages are expected; raise a
        :class:`~roomcast.protocol.errors.ProtocolError` for a malformed one."""
        ...


class Parser(Protocol):
    @property
    def name(self) -> str: ...

    def encode(self, packet: Packet) -> list[str | bytes]:
        """The Engine.IO message payloads of ``packet`` (text without the ``4``, or binary)."""
        ...

    def decoder(self, limits: Limits) -> PacketDecoder:
        """A decoder for one connection."""
        ...


PARSERS: Final[dict[str, Parser]] = {"json": JSON_PARSER, "msgpack": MSGPACK_PARSER}


def parser_named(name: str) -> Parser:
    """The parser called ``name``; raise ``KeyError`` for an unknown one."""
    return PARSERS[name]
