"""Roomcast configured as the official Engine.IO v4 and Socket.IO v5 test suites expect.

    python examples/protocol_suites.py --port 3000

- ``/engine.io/``: a raw Engine.IO server that echoes every message;
- ``/socket.io/``: namespaces ``/`` and ``/custom``, no token required, pingInterval 300 ms,
  pingTimeout 200 ms, connectTimeout 1000 ms, maxPayload 1,000,000 bytes, any origin.
"""

from __future__ import annotations

import argparse
from typing import Any

from roomcast import Application, Socket
from roomcast.config import Settings
from roomcast.connection import Connection
from roomcast.runner import run

app = Application()


@app.on_connect()
async def send_auth(socket: Socket) -> None:
    socket.emit("auth", socket.auth)


@app.on("message")
async def message(socket: Socket, *args: Any) -> None:
    socket.emit("message-back", *args)


@app.on("message-with-ack")
async def message_with_ack(socket: Socket, *args: Any) -> tuple[Any, ...]:
    return args


@app.on_connect("/custom")
async def send_auth_custom(socket: Socket) -> None:
    socket.emit("auth", socket.auth)


class Echo:
    """A raw Engine.IO application: every message goes back to its sender."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def on_message(self, message: str | bytes) -> None:
        self.conn.send_messages([message])

    def on_close(self, reason: str) -> None:
        return


def settings(port: int, host: str = "127.0.0.1") -> Settings:
    return Settings(
        host=host,
        port=port,
        auth_required=False,
        ping_interval_ms=300,
        ping_timeout_ms=200,
        connect_timeout_ms=1000,
        max_payload=1_000_000,
        allowed_origins=("*",),
        recovery_max_disconnection_ms=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    run(settings(args.port, args.host), app, mounts={"/engine.io/": Echo})


if __name__ == "__main__":
    main()
