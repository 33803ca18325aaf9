"""Hostile WebSocket frames get a close with a reason, are counted, and leave no traceback."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from typing import Any

import pytest

from conftest_helpers import token_for
from wire import Raw, connect_sio, running


def _masked(opcode: int, payload: bytes) -> bytes:
    """One final client frame (clients always mask)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + body


async def _open_raw_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake by hand, so that frames no client library would send can follow."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    writer.write(
        (
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _close_code(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read server frames until the close frame; return its code and reason."""
    async with asyncio.timeout(5):
        while True:
            first, second = await reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)
            if first & 0x0F == 0x8:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


async def _still_served(port: int) -> None:
    """A well-behaved client connects, joins and is answered."""
    good = await connect_sio(port, {"token": token_for("doc:*")})
    assert str(await good.recv()).startswith("40")
    await good.send('421["join","doc:1"]')
    assert await good.recv() == '431[{"ok":true}]'
    await good.close()


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Fatal error" not in record.getMessage(), record.getMessage()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("42" + "7" * 5000 + '["e"]', "invalid_socketio_packet"),  # an ack id of 5,000 digits
        ("45" + "1" * 5000 + '-["e",{"_placeholder":true,"num":0}]', "too_many_attachments"),
    ],
    ids=["ack-id-digits", "attachment-count-digits"],
)
async def test_runs_of_digits_close_the_session_with_a_counted_reason(
    frame: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Thousands of digits where a number goes (Python's int() refuses them) close the
    session as a protocol error, counted by reason, with no traceback."""
    caplog.set_level(logging.INFO)
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await raw.recv()).startswith("40")
        await raw.send(frame)
        assert await raw.closed()
        counted = node.metrics.registry.get_sample_value(
            "roomcast_protocol_errors_total", {"reason": reason}
        )
        assert counted == 1
        await _still_served(node.port)
    _no_traceback(caplog)


async def test_a_text_frame_that_is_not_utf8_gets_close_1007(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A text frame with invalid UTF-8 is answered with close code 1007 and a reason, and
    counted as a disconnect by reason; no traceback."""
    caplog.set_level(logging.INFO)
    async with running() as node:
        reader, writer = await _open_raw_websocket(node.port)
        writer.write(_masked(0x1, b"4\xff\xfe"))
        code, why = await _close_code(reader)
        assert code == 1007 and "utf-8" in why, (code, why)
        writer.close()
        counted = node.metrics.registry.get_sample_value(
            "roomcast_disconnects_total", {"reason": "websocket_invalid_data"}
        )
        assert counted == 1
        await _still_served(node.port)
    _no_traceback(caplog)


async def test_client_close_codes_do_not_become_label_values() -> None:
    """Whatever close code a client sends, the disconnect is counted under one label."""
    async with running() as node:
        for code in (1000, 3001, 4321, 4999):
            raw = await Raw.connect(node.port)
            await raw.ws.close(code)
        registry: Any = node.metrics.registry
        labels = set()
        for metric in registry.collect():
            if metric.name == "roomcast_disconnects":
                labels |= {s.labels["reason"] for s in metric.samples if "reason" in s.labels}
        assert labels == {"client_closed_websocket"}, labels


async def test_a_binary_frame_is_not_utf8_checked() -> None:
    """Binary frames carry any bytes (an attachment may be anything)."""
    async with running() as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await raw.recv()).startswith("40")
        await raw.send(b"\xff\xfe")  # an attachment nobody announced: a protocol error ...
        assert await raw.closed()
        counted = node.metrics.registry.get_sample_value(
            "roomcast_disconnects_total", {"reason": "websocket_invalid_data"}
        )
        assert counted is None  # ... but not invalid data
