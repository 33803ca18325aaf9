"""A socket as the Admin UI shows it (its ``SerializedSocket``), with no credential in it.

The handshake is the connection's first request (headers, query, address), with the values
that are credentials replaced by ``[redacted]``: the ``Authorization`` and ``Cookie`` headers
and the like, and the ``token`` and ``sid`` query parameters.  The client id is a digest of
the Engine.IO session id, never the id itself (which would let its holder poll the session).
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

from roomcast.socket import Socket

__all__ = ["REDACTED", "client_id", "handshake", "iso_time", "serialize", "transport"]

REDACTED: Final = "[redacted]"
SECRET_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "sec-websocket-key"}
)
SECRET_QUERY: Final = frozenset({"token", "access_token", "sid", "api_key", "key"})


def iso_time(seconds: float | None = None) -> str:
    """An ISO 8601 UTC time with milliseconds, as a JavaScript ``Date`` serialises."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def client_id(session_id: str) -> str:
    """12 hex digits naming the connection (the same for every namespace of it)."""
    return hashlib.blake2b(session_id.encode(), digest_size=6).hexdigest()


def transport(socket: Socket) -> str:
    return "websocket" if socket.conn.ws is not None else "polling"


def handshake(socket: Socket, since: str | None = None) -> dict[str, Any]:
    """The connection's first request; ``since``: the socket's connect time, made already."""
    request = socket.conn.request
    headers = {
        name: (REDACTED if name in SECRET_HEADERS else value)
        for name, value in request.headers.items()
    }
    query = {
        name: (REDACTED if name.lower() in SECRET_QUERY else value)
        for name, value in request.query.items()
    }
    url = request.path + ("?" + urlencode(query, safe="[]") if query else "")
    return {
        "address": request.client,
        "headers": headers,
        "query": query,
        "issued": int(socket.since * 1000),
        "time": since or iso_time(socket.since),
        "secure": False,
        "url": url,
        "xdomain": "origin" in request.headers,
    }


def serialize(socket: Socket, instance: str, rooms: list[str] | None = None) -> dict[str, Any]:
    """The socket's ``SerializedSocket``; ``rooms`` when taken earlier (a snapshot)."""
    since = iso_time(socket.since)
    data: dict[str, Any] = {"user": socket.user_id, "instance": instance, "connectedAt": since}
    if socket.namespace.internal:
        data["admin"] = True  # an Admin UI's own socket
    return {
        "id": socket.id,
        "clientId": client_id(socket.conn.sid),
        "transport": transport(socket),
        "nsp": socket.namespace.name,
        "data": data,
        "handshake": handshake(socket, since),
        "rooms": sorted(socket.rooms) if rooms is None else rooms,
    }
