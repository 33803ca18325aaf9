"""A bounded network fuzzer: random and mutated WebSocket frames, polling bodies and HTTP
request heads against a real server.  No traceback in its log, every bad input counted, memory
back near its baseline, and a well-behaved client served throughout.

``ROOMCAST_FUZZ_SEED`` and ``ROOMCAST_FUZZ_CASES`` change the run (defaults: seed 1, 300
cases of each kind)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import struct
from typing import Any

import pytest

from conftest_helpers import token_for
from wire import connect_sio, publish, running

SEED = int(os.environ.get("ROOMCAST_FUZZ_SEED", "1"))
CASES = int(os.environ.get("ROOMCAST_FUZZ_CASES", "300"))

_VALID_MESSAGES = [
    "40",
    '40{"token":"x"}',
    '42["join","doc:1"]',
    '421["publish",{"room":"doc:1","event":"e","data":1}]',
    '451-["e",{"_placeholder":true,"num":0}]',
    "2",
    "3",
    "41",
    "5",
    "6",
    "42" + "7" * 5000 + '["e"]',
    "45" + "1" * 5000 + '-["e",{"_placeholder":true,"num":0}]',
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """Flip, insert, delete, duplicate or truncate a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        pos = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 2 and out:
            del out[pos : pos + rng.randint(1, 8)]
        elif choice == 3:
            out[pos:pos] = out[pos : pos + 16] * rng.randint(1, 50)
        else:
            del out[pos:]
    return bytes(out)


def _frame(rng: random.Random, opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    mask = rng.randbytes(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + body


def _ws_case(rng: random.Random) -> bytes:
    """Frames after a valid handshake: mutated messages, bad opcodes, lying lengths,
    non-UTF-8 text, fragmented control frames, or plain noise."""
    kind = rng.randrange(6)
    text = rng.choice(_VALID_MESSAGES).encode()
    if kind == 0:
        return _frame(rng, 0x1, _mutate(rng, text))
    if kind == 1:
        return _frame(rng, rng.choice([0x3, 0x4, 0x5, 0xB, 0xF]), text)
    if kind == 2:
        return _mutate(rng, _frame(rng, 0x1, text))
    if kind == 3:
        return _frame(rng, 0x1, b"4" + rng.randbytes(rng.randint(1, 40)))
    if kind == 4:
        return _frame(rng, 0x9, b"ping", fin=False)
    return rng.randbytes(rng.randint(1, 200))


def _head_case(rng: random.Random) -> bytes:
    head = (
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\nX-A: b\r\n\r\nhello"
    )
    return _mutate(rng, head)


async def _exchange(port: int, data: bytes) -> None:
    """Send ``data`` on a new connection; read whatever comes back until the server closes
    or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(0.1):
            while await reader.read(65536):
                pass
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.transport.abort()


def _upgrade(port: int) -> bytes:
    return (
        f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _polling_case(port: int, rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        sid = json.loads((await reader.readexactly(length))[1:])["sid"]
        body = _mutate(rng, rng.choice(_VALID_MESSAGES).encode() + b"\x1e" + b"bAQID")
        writer.write(
            f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        async with asyncio.timeout(0.1):
            await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _bad_input_count(node: Any) -> float:
    total = 0.0
    for metric in node.metrics.registry.collect():
        if metric.name in (
            "roomcast_protocol_errors",
            "roomcast_http_refused",
            "roomcast_engine_request_errors",
            "roomcast_disconnects",
        ):
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def _served(port: int, n: int) -> None:
    """A well-behaved client connects, joins and receives a publication."""
    good = await connect_sio(port, {"token": token_for("doc:*")})
    assert str(await good.recv()).startswith("40")
    await good.send('421["join","doc:ok"]')
    assert await good.recv() == '431[{"ok":true}]'
    status, _ = await publish(port, {"room": "doc:ok", "event": "e", "data": n})
    assert status == 202
    assert json.loads(str(await good.recv())[2:])[1] == n
    await good.close()


@pytest.mark.timeout(300)
async def test_random_and_mutated_input_is_refused_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CASES mutated WebSocket frame runs, polling bodies and HTTP heads each: the server
    logs no traceback, counts the bad input, returns to its memory baseline and keeps serving
    a well-behaved client (checked between batches)."""
    caplog.set_level(logging.INFO)
    rng = random.Random(SEED)
    async with running(http_head_timeout_s=1.0) as node:
        await _served(node.port, 0)
        gc.collect()
        baseline = _rss_kib()
        before = _bad_input_count(node)
        for case in range(CASES):
            frames = b"".join(_ws_case(rng) for _ in range(rng.randint(1, 4)))
            await _exchange(node.port, _upgrade(node.port) + frames)
            await _polling_case(node.port, rng)
            await _exchange(node.port, _head_case(rng))
            if case % 100 == 99:
                await _served(node.port, case)
        await _served(node.port, CASES)
        counted = _bad_input_count(node) - before
        gc.collect()
        grown_mib = (_rss_kib() - baseline) / 1024
    assert counted >= CASES, f"only {counted} bad inputs counted for {3 * CASES} cases"
    assert grown_mib < 40, f"RSS grew {grown_mib:.1f} MiB over {3 * CASES} cases"
    for record in caplog.records:
        text = record.getMessage()
        assert record.exc_info is None, f"traceback logged: {text}"
        assert "Fatal error" not in text and "Traceback" not in text, text
