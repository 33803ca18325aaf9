"""Operational endpoints: /metrics and the server APIs on a separate listener or behind a key."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from process_output import ProcessOutput

import redis_fixtures
from conftest_helpers import token_for
from redis_fixtures import free_port
from roomcast.config import ConfigError, Settings, ops_address
from wire import API_KEY, SECRET, connect_sio, running

METRICS_KEY = "metrics-key-for-tests"
PUBLISH = {"room": "doc:1", "event": "e", "data": {"n": 1}}

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix


async def _get(port: int, path: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response,
    ):
        return response.status, await response.text()


async def _publish(port: int, key: str = API_KEY) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/api/v1/publish",
            json=PUBLISH,
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        await response.read()
        return response.status


async def _metrics_status(port: int, key: str | None = None) -> int:
    status, body = await _get(port, "/metrics", key)
    if status == 200:
        assert "roomcast_connections" in body
    return status


# --------------------------------------------------------------------------- one listener


async def test_development_serves_metrics_openly_on_the_main_port() -> None:
    """Without --production and without an ops listener, /metrics and the API are on the main
    port, /metrics without a key (as before)."""
    async with running() as node:
        assert node.ops_port is None
        assert await _metrics_status(node.port) == 200
        assert await _publish(node.port) == 202


async def test_production_asks_for_the_api_key_on_metrics() -> None:
    """With --production and no ops listener, /metrics on the main port needs the API key."""
    async with running(production=True) as node:
        status, body = await _get(node.port, "/metrics")
        assert status == 401 and '"unauthorized"' in body and "metrics key" in body
        assert await _metrics_status(node.port, "wrong") == 401
        assert await _metrics_status(node.port, API_KEY) == 200
        assert (await _get(node.port, "/healthz"))[0] == 200
        assert (await _get(node.port, "/readyz"))[0] == 200


async def test_a_metrics_key_replaces_the_api_key_for_metrics() -> None:
    """With --metrics-key, /metrics asks for that key, and the API key no longer opens it."""
    async with running(production=True, metrics_key=METRICS_KEY) as node:
        assert await _metrics_status(node.port, API_KEY) == 401
        assert await _metrics_status(node.port, METRICS_KEY) == 200
        assert await _publish(node.port, METRICS_KEY) == 401  # nor the other way round
    async with running(metrics_key=METRICS_KEY) as node:  # in development too
        assert await _metrics_status(node.port) == 401
        assert await _metrics_status(node.port, METRICS_KEY) == 200


# --------------------------------------------------------------------------- ops listener


async def test_an_ops_listener_takes_metrics_and_the_api_off_the_main_port() -> None:
    """With --ops-listen, the main port serves clients and probes only; the ops port serves
    /metrics (no key in production: its address protects it), the probes and the API, and no
    Socket.IO."""
    async with running(production=True, ops_listen="127.0.0.1:0") as node:
        ops = node.ops_port
        assert ops is not None and ops != node.port
        # main port: no /metrics, no API, whatever the key
        for key in (None, API_KEY):
            status, body = await _get(node.port, "/metrics", key)
            assert status == 404 and '"not_found"' in body
        assert await _publish(node.port) == 404
        for path in ("/api/v1/sockets?room=doc:1", "/api/v1/rooms/doc:1"):
            assert (await _get(node.port, path, API_KEY))[0] == 404
            assert (await _get(ops, path, API_KEY))[0] == 200
        assert (await _get(node.port, "/healthz"))[0] == 200
        assert (await _get(node.port, "/readyz"))[0] == 200
        raw = await connect_sio(node.port, {"token": token_for("doc:*")})
        assert (await raw.recv()).startswith("40")
        await raw.send('421["join","doc:1"]')
        assert await raw.recv() == '431[{"ok":true}]'
        # ops port
        assert await _metrics_status(ops) == 200
        assert await _publish(ops) == 202
        assert await _publish(ops, "wrong") == 401
        assert (await raw.recv()).startswith('42["e",{"n":1}')
        assert (await _get(ops, "/readyz"))[0] == 200
        assert (await _get(ops, "/healthz"))[0] == 200
        status, _ = await _get(ops, "/socket.io/?EIO=4&transport=polling")
        assert status == 404
        await raw.close()


async def test_an_ops_listener_with_a_metrics_key_asks_for_it() -> None:
    """A metrics key applies on the ops listener too."""
    async with running(ops_listen="127.0.0.1:0", metrics_key=METRICS_KEY) as node:
        assert node.ops_port is not None
        assert await _metrics_status(node.ops_port) == 401
        assert await _metrics_status(node.ops_port, METRICS_KEY) == 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9100", ("::1", 9100)),
        ("metrics.internal:9100", ("metrics.internal", 9100)),
    ],
)
def test_ops_listen_parses_host_and_port(value: str, expected: tuple[str, int]) -> None:
    """ops_listen is host:port, with brackets around an IPv6 address."""
    assert ops_address(value) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ops_listen": "9100"}, "ops_listen must be host:port"),
        ({"ops_listen": ":9100"}, "ops_listen must be host:port"),
        ({"ops_listen": "h:70000"}, "ops_listen must be host:port"),
        ({"ops_listen": "h:x"}, "ops_listen must be host:port"),
        ({"ops_listen": "127.0.0.1:8000"}, "must differ from host:port"),
        ({"ops_listen": "127.0.0.1:0", "workers": 2}, "needs workers = 1"),
    ],
)
def test_bad_ops_listen_is_refused_naming_the_key(overrides: dict[str, Any], message: str) -> None:
    """A malformed or clashing ops_listen fails validation, naming the key."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(host="127.0.0.1", port=8000, **overrides).validate()


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def _serve(*extra: str) -> Iterator[tuple[int, ProcessOutput]]:
    """``roomcast serve --production`` on a free port; yields the port and its output."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env.update(ROOMCAST_JWT_SECRET=SECRET, ROOMCAST_API_KEY=API_KEY)
    command = [sys.executable, "-m", "roomcast", "serve", "--production", "--port", str(port)]
    command += ["--allowed-origins", "https://a.example", "--drain-seconds", "1", *extra]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with proc:
        assert proc.stdout is not None
        output = ProcessOutput(proc.stdout)
        try:
            yield port, output
        finally:
            proc.terminate()
            proc.wait(20)


def _ready_pids(lines: list[str]) -> set[str]:
    return {
        m.group(1)
        for line in lines
        if (m := re.fullmatch(r"roomcast ready on \S+ \(pid (\d+)\)\n", line))
    }


def _sync_get(port: int, path: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Connection": "close"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def test_serve_prints_where_the_ops_listener_is() -> None:
    """``serve --ops-listen host:0`` prints the ops address before its ready line."""
    with _serve("--ops-listen", "127.0.0.1:0") as (port, output):
        lines = output.wait_for("the ready line", lambda lines: bool(_ready_pids(lines)), 20)
        ops_lines = [
            m
            for line in lines
            if (m := re.fullmatch(r"roomcast ops on 127\.0\.0\.1:(\d+) \(pid \d+\)\n", line))
        ]
        assert len(ops_lines) == 1, lines
        ops = int(ops_lines[0].group(1))
        assert _sync_get(port, "/metrics")[0] == 404
        status, body = _sync_get(ops, "/metrics")
        assert status == 200 and "roomcast_connections" in body


@pytest.mark.redis
@pytest.mark.parametrize("ops", [False, True])
def test_workers_merge_metrics_behind_the_key_or_on_the_ops_port(
    redis_url: str, redis_prefix: str, ops: bool
) -> None:
    """With two workers in production, a scrape through the key (main port) or through the ops
    port still reports both workers: they ask each other on their peer sockets, which need no
    key, while the main port never serves /metrics without it."""
    ops_port = free_port()
    extra = ["--workers", "2", "--redis-url", redis_url, "--redis-prefix", redis_prefix]
    if ops:
        extra += ["--ops-listen", f"127.0.0.1:{ops_port}"]
    with _serve(*extra) as (port, output):
        output.wait_for("both workers ready", lambda lines: len(_ready_pids(lines)) == 2, 20)
        for _ in range(6):  # a fresh connection each: the kernel spreads them over the workers
            if ops:
                assert _sync_get(port, "/metrics", API_KEY)[0] == 404
                status, body = _sync_get(ops_port, "/metrics")
            else:
                assert _sync_get(port, "/metrics")[0] == 401
                assert _sync_get(port, "/metrics?scope=worker")[0] == 401
                status, body = _sync_get(port, "/metrics", API_KEY)
            assert status == 200, body
            up = re.findall(r'roomcast_worker_up\{worker="(\d+)"\} 1\.0', body)
            assert sorted(up) == ["00", "01"], body
