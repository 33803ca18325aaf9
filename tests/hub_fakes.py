"""Sans-I/O stand-ins for hub tests: a transport that records what is written, and a hub
member around a connection."""

from __future__ import annotations

from roomcast.connection import Connection


class RecordingTransport:
    """What a connection writes, kept in ``writes``; never full, no peer."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> object:
        return None


class Member:
    """A hub member: a connection and its id."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.id = conn.sid
