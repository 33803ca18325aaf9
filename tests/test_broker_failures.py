"""Every Redis failure is a clear, retryable answer: a TCP proxy between Roomcast and a real
redis-server is paused, reset and closed mid-command, and Redis refuses commands (memory
full, a key of the wrong type).  Nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

import redis_fixtures
from conftest_helpers import token_for
from redis_fixtures import RedisServer, eventually
from roomcast.broker.keys import Keys
from roomcast.broker.redis import RedisBroker
from wire import Raw, connect_sio, publish, running

redis_server_factory = redis_fixtures.redis_server_factory
pytestmark = pytest.mark.redis


class Proxy:
    """A TCP proxy the test controls: forward, hold bytes (pause), reset or close links."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: list[tuple[socket.socket, asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.accepting = True
        self.close_on_data = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            self._reset(writer)
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.links.append((writer.get_extra_info("socket"), writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer, upstream=True),
            self._pump(up_reader, writer, upstream=False),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                if upstream and self.close_on_data:
                    writer.close()  # the command is cut in the middle: it never reaches Redis
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        if writer.transport.is_closing():
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def reset_all(self) -> None:
        """Reset every client-side link (RST), as a dying middlebox would."""
        for _, writer, up_writer in self.links:
            self._reset(writer)
            up_writer.close()
        self.links.clear()

    async def stop(self) -> None:
        self.reset_all()
        if self.server is not None:
            self.server.close()


async def _status(port: int, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status


async def _publish_all(port: int, room: str, start: int, count: int) -> tuple[list[int], list[Any]]:
    """Publish ``count`` numbered events; the numbers acknowledged (202: stored), and the
    other answers (each must be a 503 with a JSON error)."""
    acked: list[int] = []
    refused: list[Any] = []
    for n in range(start, start + count):
        status, body = await publish(port, {"room": room, "event": "e", "data": n})
        if status == 202:
            acked.append(n)
        else:
            refused.append((status, body))
    return acked, refused


@pytest.fixture
async def proxied(
    redis_server_factory: Callable[..., RedisServer],
) -> Any:
    server = redis_server_factory()
    proxy = Proxy(server.port)
    await proxy.start()
    yield server, proxy
    await proxy.stop()


async def test_a_link_reset_closed_or_stalled_gives_503_and_loses_nothing_acked(
    proxied: tuple[RedisServer, Proxy],
) -> None:
    """While the link is reset, refused, cut mid-command or stalled, the publish API answers
    503 with a JSON error (never 500) and /readyz follows; after it heals, every publication
    acknowledged (202) reaches the subscribed client, in order."""
    _, proxy = proxied
    async with running(redis_url=proxy.url, redis_prefix="fail") as node:
        reader = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await reader.recv()).startswith("40")
        await reader.send('421["join","doc:1"]')
        assert await reader.recv(timeout=10) == '431[{"ok":true}]'
        received: list[int] = []

        async def collect() -> None:  # reads all along, so the heartbeat is answered meanwhile
            while True:
                received.append(json.loads(str(await reader.recv(timeout=120))[2:])[1])

        collector = asyncio.create_task(collect())
        acked, refused = await _publish_all(node.port, "doc:1", 0, 3)
        assert acked == [0, 1, 2] and not refused, refused

        proxy.accepting = False  # reset now, and refuse to reconnect
        proxy.reset_all()
        more, refused_down = await _publish_all(node.port, "doc:1", 3, 3)
        acked += more
        await eventually(lambda: not node.readiness()[0], timeout=10, what="/readyz to fail")
        assert await _status(node.port, "/readyz") == 503

        proxy.accepting = True
        await eventually(lambda: node.readiness()[0], timeout=15, what="/readyz to recover")
        proxy.close_on_data = True  # the next command is cut in the middle
        more, refused_cut = await _publish_all(node.port, "doc:1", 6, 1)
        acked += more
        proxy.close_on_data = False
        await eventually(lambda: node.readiness()[0], timeout=15, what="/readyz to recover")

        proxy.flowing.clear()  # stalled: bytes go nowhere until the command times out
        started = time.monotonic()
        more, refused_stall = await _publish_all(node.port, "doc:1", 7, 1)
        assert time.monotonic() - started < 15
        acked += more
        proxy.flowing.set()
        await eventually(lambda: node.readiness()[0], timeout=15, what="/readyz to recover")
        more, refused = await _publish_all(node.port, "doc:1", 8, 2)
        acked += more
        assert more == [8, 9], refused

        for status, body in [*refused_down, *refused_cut, *refused_stall]:
            assert status == 503, (status, body)
            assert body["error"]["code"] == "broker_unavailable", body
        assert refused_down, "publishing with the link down must fail"
        await eventually(lambda: len(received) >= len(acked), timeout=15, what="every event")
        collector.cancel()
        assert received == acked


async def test_redis_out_of_memory_is_503_and_an_error_ack(
    proxied: tuple[RedisServer, Proxy],
) -> None:
    """With Redis at maxmemory (noeviction), the publish API answers 503 and a client's
    publish gets an error ack (it never got one before)."""
    server, proxy = proxied
    async with running(redis_url=proxy.url, redis_prefix="oom") as node:
        client = await connect_sio(node.port, {"token": token_for("doc:*", publish=("doc:*",))})
        assert str(await client.recv()).startswith("40")
        direct = aioredis.Redis.from_url(server.url)
        try:
            await direct.config_set("maxmemory-policy", "noeviction")
            await direct.config_set("maxmemory", "1")
            status, body = await publish(node.port, {"room": "doc:1", "event": "e", "data": 1})
            assert status == 503 and body["error"]["code"] == "broker_unavailable", body
            assert "maxmemory" in body["error"]["message"]
            await client.send('421["publish",{"room":"doc:1","event":"e","data":1}]')
            ack = json.loads(str(await client.recv(timeout=10))[3:])[0]
            assert ack["ok"] is False and ack["error"]["code"] == "unavailable", ack
        finally:
            await direct.config_set("maxmemory", "0")
            await direct.aclose()
        status, _ = await publish(node.port, {"room": "doc:1", "event": "e", "data": 2})
        assert status == 202


async def test_a_room_of_the_wrong_type_fails_alone(
    proxied: tuple[RedisServer, Proxy],
) -> None:
    """A room whose key is not a stream gets an error ack at join (its join hung before); the
    other rooms keep delivering, also after a reconnect (every reconnect failed before)."""
    server, proxy = proxied
    direct = aioredis.Redis.from_url(server.url)
    await direct.set(Keys("wrong").room("doc:bad"), "not a stream")
    await direct.aclose()
    async with running(redis_url=proxy.url, redis_prefix="wrong") as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await raw.recv()).startswith("40")
        await raw.send('421["join","doc:good"]')
        assert await raw.recv(timeout=10) == '431[{"ok":true}]'
        await raw.send('422["join","doc:bad"]')
        ack = json.loads(str(await raw.recv(timeout=10))[3:])[0]
        assert ack["ok"] is False and ack["error"]["code"] == "room_unavailable", ack
        assert ("/", "doc:bad") not in node.hub.rooms

        proxy.reset_all()  # a blip: the broker reconnects and re-reads its rooms
        await eventually(lambda: node.readiness()[0], timeout=15, what="the reconnect")
        for n in range(3):
            for _ in range(50):
                status, _ = await publish(node.port, {"room": "doc:good", "event": "e", "data": n})
                if status == 202:
                    break
                await asyncio.sleep(0.1)
            assert status == 202
        got = [json.loads(str(await raw.recv(timeout=10))[2:])[1] for _ in range(3)]
        assert got == [0, 1, 2]
        other = await Raw.connect(node.port)
        await other.close()


async def test_an_upstream_stream_of_the_wrong_type_is_refused_not_unavailable(
    proxied: tuple[RedisServer, Proxy],
) -> None:
    """An upstream event Redis refuses (its stream key holds a string) is acked
    broker_refused, which a retry would not mend, not 'unavailable, retry'."""
    server, proxy = proxied
    direct = aioredis.Redis.from_url(server.url)
    await direct.set(Keys("upwrong").upstream(), "not a stream")
    await direct.aclose()
    async with running(
        redis_url=proxy.url, redis_prefix="upwrong", upstream_events=("typing",)
    ) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert str(await raw.recv()).startswith("40")
        await raw.send('421["typing",{"doc":1}]')
        ack = json.loads(str(await raw.recv(timeout=10))[3:])[0]
        assert ack["ok"] is False and ack["error"]["code"] == "broker_refused", ack


async def test_a_redis_that_refuses_writes_still_delivers(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """The instance registry's heartbeat is a write: a Redis out of memory refuses it, and the
    broker still starts, stays ready and delivers (counted announce_failed)."""
    server = redis_server_factory()
    direct = aioredis.Redis.from_url(server.url)
    await direct.xadd(Keys("full").room("doc:1"), {"seed": "x"})
    broker = RedisBroker(server.url, prefix="full", ping_interval=0.2)
    broker.on_control(lambda message: None)
    got: list[Any] = []
    try:
        await direct.config_set("maxmemory-policy", "noeviction")
        await direct.config_set("maxmemory", "1")
        await broker.start(got.append)
        await broker.subscribe("doc:1")
        await eventually(lambda: broker.errors["announce_failed"] >= 2, what="heartbeats")
        assert broker.ready and broker.errors["unexpected"] == 0
        await direct.config_set("maxmemory", "0")
        await direct.xadd(Keys("full").room("doc:1"), {"room": "doc:1", "event": "e", "data": "1"})
        await eventually(lambda: len(got) == 1, what="the delivery")
    finally:
        await direct.config_set("maxmemory", "0")
        await broker.stop()
        await direct.aclose()
