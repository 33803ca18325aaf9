"""Backpressure: a client that stops reading is disconnected; the others are not slowed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket

from conftest_helpers import token_for
from wire import connect_sio, publish, running


async def _stalled_client(port: int, token: str) -> socket.socket:
    """A WebSocket client that connects, joins doc:1, then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /socket.io/?EIO=4&transport=websocket&token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await asyncio.sleep(0)

    def frame(text: str) -> bytes:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x81, 0x80 | len(payload)]) + mask + masked

    sock.sendall(frame("40") + frame('421["join","doc:1"]'))
    return sock


async def test_slow_client_is_disconnected_and_others_get_everything() -> None:
    """A member that stops reading is dropped with a counted reason; a reading member gets all."""
    async with running(outbound_buffer_limit=64 * 1024, recovery_max_disconnection_ms=0) as node:
        reader = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert (await reader.recv()).startswith("40")
        await reader.send('421["join","doc:1"]')
        assert await reader.recv() == '431[{"ok":true}]'
        stalled = await _stalled_client(node.port, token_for("doc:*"))
        for _ in range(200):
            if len(node.hub.rooms.get(("/", "doc:1"), ())) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(node.hub.rooms[("/", "doc:1")]) == 2
        blob = "x" * 20_000
        count = 400
        received = 0

        async def read_all() -> None:
            nonlocal received
            while received < count:
                message = await reader.recv(timeout=20)
                assert json.loads(str(message)[2:])[1]["i"] == received
                received += 1

        reading = asyncio.create_task(read_all())
        for i in range(count):
            status, _ = await publish(
                node.port, {"room": "doc:1", "event": "big", "data": {"i": i, "b": blob}}
            )
            assert status == 202
        await asyncio.wait_for(reading, 30)
        assert received == count
        slow = node.metrics.registry.get_sample_value("roomcast_slow_client_disconnects_total")
        assert slow == 1
        lost = node.metrics.registry.get_sample_value(
            "roomcast_dropped_messages_total", {"reason": "slow_client"}
        )
        assert lost is not None and lost >= 1, "the slow client's queued messages are counted"
        assert len(node.hub.rooms[("/", "doc:1")]) == 1
        stalled.close()
