"""Raw Engine.IO / Socket.IO clients for wire-level tests: real sockets, no client library."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

from roomcast.app import Application
from roomcast.config import Settings
from roomcast.node import Node

SECRET = "s" * 48
API_KEY = "test-api-key-0123456789"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "jwt_secret": SECRET,
        "api_key": API_KEY,
        "ping_interval_ms": 2000,
        "ping_timeout_ms": 2000,
        "connect_timeout_ms": 3000,
        # Clients told to leave at once: tests of the gradual drain pass these again.
        "drain_delay_s": 0.0,
        "drain_window_s": 0.0,
    }
    base.update(overrides)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running(app: Application | None = None, **overrides: Any) -> AsyncIterator[Node]:
    node = Node(settings(**overrides), app)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


class Raw:
    """A raw WebSocket speaking Engine.IO text packets; answers pings when asked to."""

    def __init__(self, ws: ClientConnection, pong: bool = True) -> None:
        self.ws = ws
        self.pong = pong
        self.handshake: dict[str, Any] = {}

    @classmethod
    async def connect(cls, port: int, query: str = "", pong: bool = True) -> Raw:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket{query}"
        )
        raw = cls(ws, pong)
        first = await raw.recv()
        assert isinstance(first, str) and first.startswith("0"), first
        raw.handshake = json.loads(first[1:])
        return raw

    async def send(self, message: str | bytes) -> None:
        await self.ws.send(message)

    async def recv(self, timeout: float = 5.0) -> str | bytes:
        """The next message other than a ping; ``timeout`` bounds the whole wait (pings that
        come meanwhile are answered, and do not restart it)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.ws.recv()
                if message == "2" and self.pong:
                    await self.ws.send("3")
                    continue
                return message

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (messages before that are skipped)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.recv(timeout)
        except websockets.ConnectionClosed:
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        await self.ws.close()


async def connect_sio(port: int, auth: dict[str, Any] | None = None, query: str = "") -> Raw:
    raw = await Raw.connect(port, query)
    await raw.send("40" + (json.dumps(auth) if auth is not None else ""))
    return raw


async def publish(port: int, body: dict[str, Any], key: str = API_KEY) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/api/v1/publish",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        return response.status, await response.json()
