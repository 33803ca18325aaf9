"""HTTP connections before a handler answers: every limit answers (or closes) at once, counts
its reason, and a well-behaved client is served meanwhile."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

import aiohttp
import pytest

from roomcast.transport.http import Exchange, HttpConnection, Request
from wire import API_KEY, running


async def _answer(reader: asyncio.StreamReader, timeout: float = 3.0) -> tuple[int, Any]:
    """Status and JSON body of the response the server sends (then closes)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":")[1])
        body = await reader.readexactly(length)
    return status, json.loads(body) if body else None


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closed the connection within ``timeout`` (anything it sent skipped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def _healthz(port: int) -> float:
    """Seconds /healthz took to answer 200."""
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}/healthz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
    return time.perf_counter() - started


def _refused(node: Any, reason: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "roomcast_http_refused_total", {"reason": reason}
    )
    return value or 0.0


def _publish_head(extra: str) -> bytes:
    return (
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


async def test_a_body_of_many_tiny_chunks_does_not_stall_the_loop() -> None:
    """30,000 one-byte chunks are read in linear time (the size was re-summed per chunk, and
    50,000 chunks blocked the loop 45 s); /healthz answers meanwhile."""
    async with running() as node:
        reader, writer = await _open(node.port)
        writer.write(_publish_head("Transfer-Encoding: chunked\r\n"))
        started = time.perf_counter()
        writer.write(b"1\r\nx\r\n" * 30_000 + b"0\r\n\r\n")
        status, body = await _answer(reader, timeout=10)
        elapsed = time.perf_counter() - started
        assert status == 400 and body["error"]["code"] == "invalid_json"
        assert elapsed < 3, f"30,000 chunks took {elapsed:.1f} s"
        assert await _healthz(node.port) < 1
        writer.close()


async def test_too_many_headers_get_431_at_once() -> None:
    """5,000 repeats of one header are refused with 431 after the hundredth, counted."""
    async with running() as node:
        reader, writer = await _open(node.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n")
        status, body = await _answer(reader)
        assert status == 431 and body["error"]["code"] == "headers_too_large"
        assert _refused(node, "headers_too_large") == 1
        assert await _healthz(node.port) < 1
        writer.close()


async def test_a_huge_header_is_refused_without_being_buffered() -> None:
    """A 64 MB header gets 431 after the first 16 KiB; the server's memory stays flat (a
    300 MB header took RSS from 40 to 509 MiB before)."""
    async with running() as node:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reader, writer = await _open(node.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        try:
            for _ in range(64):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 2)
        except (ConnectionError, TimeoutError):
            pass  # refused and closed while we were still sending: expected
        status, body = await _answer(reader)
        assert status == 431 and body["error"]["code"] == "headers_too_large"
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 32, f"RSS grew {grown_mib:.0f} MiB"
        writer.close()


async def test_a_long_url_gets_414() -> None:
    """A request line over the head limit is refused with 414."""
    async with running(http_max_head_bytes=4096) as node:
        reader, writer = await _open(node.port)
        writer.write(b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = await _answer(reader)
        assert status == 414 and body["error"]["code"] == "url_too_long"
        writer.close()


@pytest.mark.parametrize("target", ["/api/v1/publish", "/socket.io/?EIO=4&transport=polling"])
async def test_an_oversized_body_gets_413_before_it_is_sent(target: str) -> None:
    """A Content-Length over the limit is answered 413 with a JSON error as soon as the
    head arrives, without waiting for (or reading) the body; on the publish API and on
    polling POSTs alike (a 10 MB publish got a connection reset before)."""
    async with running(max_payload=100_000) as node:
        reader, writer = await _open(node.port)
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n".encode()
        )
        writer.write(b"{" + b" " * 1000)  # a little of the body, never the rest
        status, body = await _answer(reader)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        assert _refused(node, "body_too_large") == 1
        writer.close()


async def test_a_chunked_body_is_refused_once_it_passes_the_limit() -> None:
    """A chunked body is counted as it arrives: 413 once past the limit."""
    async with running(max_payload=10_000) as node:
        reader, writer = await _open(node.port)
        writer.write(_publish_head("Transfer-Encoding: chunked\r\n"))
        writer.write((b"4000\r\n" + b"x" * 0x4000 + b"\r\n") * 8)  # 128 KiB > 10 kB + 64 KiB
        status, body = await _answer(reader)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        writer.close()


async def test_slow_and_silent_connections_are_closed() -> None:
    """Connections that send nothing, or half a head, are closed after the head timeout
    (408 for the half head), counted; they were held forever before."""
    async with running(http_head_timeout_s=0.5) as node:
        silent = [await _open(node.port) for _ in range(20)]
        half = [await _open(node.port) for _ in range(20)]
        for _, writer in half:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.perf_counter()
        assert await _healthz(node.port) < 1
        for reader, _ in silent:
            assert await _closed(reader, 3)
        for reader, _ in half:
            status, body = await _answer(reader)
            assert status == 408 and body["error"]["code"] == "head_timeout"
        assert time.perf_counter() - started < 3
        assert _refused(node, "head_timeout") == 40
        for _, writer in silent + half:
            writer.close()


async def test_idle_keep_alive_connections_close_but_held_polls_do_not() -> None:
    """A keep-alive connection idle after its answer is closed after the idle timeout; a
    long-poll held longer than that is not (it is a request in progress)."""
    async with running(http_idle_timeout_s=0.3, ping_interval_ms=1500) as node:
        reader, writer = await _open(node.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200")
        started = time.perf_counter()
        assert await _closed(reader, 3)
        assert 0.25 < time.perf_counter() - started < 2
        assert _refused(node, "idle_timeout") == 1

        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
            async with session.get(base) as response:
                sid = json.loads((await response.text())[1:])["sid"]
            started = time.perf_counter()
            async with session.get(f"{base}&sid={sid}") as response:  # held until the ping
                assert response.status == 200 and await response.text() == "2"
            assert time.perf_counter() - started > 1.0
        writer.close()


async def test_pipelined_requests_behind_a_held_poll_stop_the_reading() -> None:
    """Requests pipelined behind a held long-poll are not read until it is answered: the
    client's writes back up instead of the server's memory growing (1.5 GB in 5 s before)."""
    async with running(ping_interval_ms=20_000, ping_timeout_ms=20_000) as node:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
            async with session.get(base) as response:
                sid = json.loads((await response.text())[1:])["sid"]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _, writer = await _open(node.port)
        poll = f"GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(poll.encode())
        flood = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000
        backed_up = False
        for _ in range(200):  # up to ~150 MB, unless the server stops reading first
            writer.write(flood)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                backed_up = True
                break
        assert backed_up, "the server kept reading pipelined requests"
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB"
        assert await _healthz(node.port) < 1
        writer.transport.abort()


async def test_connections_per_address_are_capped() -> None:
    """Over max_connections_per_ip, a connection is answered 429 and counted; closing one
    makes room again."""
    async with running(max_connections_per_ip=3) as node:
        held = [await _open(node.port) for _ in range(3)]
        reader, writer = await _open(node.port)
        status, body = await _answer(reader)
        assert status == 429 and body["error"]["code"] == "too_many_connections"
        assert _refused(node, "too_many_connections") == 1
        held[0][1].close()
        await asyncio.sleep(0.1)
        assert await _healthz(node.port) < 1
        for _, w in held[1:]:
            w.close()
        writer.close()


async def test_behind_a_trusted_proxy_the_forwarded_client_is_capped() -> None:
    """From a trusted proxy, the cap applies to the client X-Forwarded-For names: a third
    connection of one client is refused while another client still gets in."""
    async with running(max_connections_per_ip=2, trusted_proxies=("127.0.0.1",)) as node:

        async def request(client: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await _open(node.port)
            writer.write(
                f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n\r\n".encode()
            )
            return reader, writer

        first = [await request("203.0.113.7") for _ in range(2)]
        for reader, _ in first:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200")
        reader, writer = await request("203.0.113.7")
        status, body = await _answer(reader)
        assert status == 429 and body["error"]["code"] == "too_many_connections"
        other, other_writer = await request("198.51.100.1")
        head = await asyncio.wait_for(other.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200")
        for _, w in [*first, (reader, writer), (other, other_writer)]:
            w.close()


class _Broken:
    """A handler with a bug."""

    def handle(self, request: Request, exchange: Exchange) -> None:
        raise RuntimeError("bug in a handler")


async def test_a_bug_is_a_logged_500_and_malformed_input_a_quiet_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler's bug is answered 500 and logged at ERROR with its traceback (it was a 400
    'malformed request' at INFO); a malformed request is a 400 whose log line holds none of
    the request's bytes (its Authorization header was logged before)."""
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpConnection(_Broken()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await _open(port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = await _answer(reader)
        assert status == 500 and body["error"]["code"] == "internal_error"
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and errors[0].exc_info is not None
        writer.close()

        reader, writer = await _open(port)
        writer.write(b"GET / HTTP/1.1\r\nAuthorization: Bearer s3cr3t-token\r\n\x00\x01\r\n\r\n")
        status, body = await _answer(reader)
        assert status == 400 and body["error"]["code"] == "malformed_request"
        assert not any("s3cr3t" in r.getMessage() for r in caplog.records)
        writer.close()
    finally:
        server.close()


async def test_a_request_refused_behind_a_held_poll_ends_the_poll_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request pipelined behind a held long-poll and refused (too many headers) closes the
    connection; the poll is released, and answering it later writes nothing and logs no
    error (writing after the refusal's end of stream would raise)."""
    async with running(ping_interval_ms=300, ping_timeout_ms=5000) as node:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{node.port}/socket.io/?EIO=4&transport=polling"
            async with session.get(base) as response:
                sid = json.loads((await response.text())[1:])["sid"]
        reader, writer = await _open(node.port)
        poll = f"GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write(poll.encode() + b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 500 + b"\r\n")
        status, body = await _answer(reader)
        assert status == 431 and body["error"]["code"] == "headers_too_large"
        await asyncio.sleep(0.6)  # past the ping that would have answered the poll
        assert await _healthz(node.port) < 1
        writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
