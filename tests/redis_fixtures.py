"""Real Redis for tests: servers on free ports, a 3-node cluster, unique key prefixes.

Test modules import what they use (``from redis_fixtures import ...``); pytest finds fixtures
by name in the importing module.  ``REDIS_URL``, if set, replaces the shared server.  When
``redis-server`` is missing, fixtures skip locally and FAIL when the ``CI`` variable is set.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from roomcast.broker.base import Publication

READY_TIMEOUT = 15.0


def require_binary(name: str) -> str:
    """The path of ``name``; skip the test without it, or fail it on CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port(*, with_bus: bool = False) -> int:
    """A TCP port nobody listens on; with ``with_bus``, port + 10000 is free too (cluster)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _answers_ping(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False
    finally:
        client.close()


class RedisServer:
    """One ``redis-server`` process without persistence, restartable on the same port."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None) -> None:
        self.binary = require_binary("redis-server")
        self.port = port if port is not None else free_port(with_bus="--cluster-enabled" in args)
        self.workdir = workdir
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        log = str(self.workdir / f"redis-{self.port}.log")
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.workdir), "--logfile", log, *self.args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited with {process.returncode}: {command}")
            return _answers_ping(self.port)

        wait_until(ready, timeout=READY_TIMEOUT, what=f"redis-server on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the server: an outage with no goodbye to clients."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the shared Redis: ``REDIS_URL`` or a server started for this session."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (to kill, restart or reconfigure); all stopped after the test."""
    servers: list[RedisServer] = []

    def factory(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", *args)
        servers.append(server)
        server.start()
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses, so tests may share one Redis and run in parallel."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local 3-primary Redis Cluster (``REDIS_CLUSTER_URL`` if set); the URL of one node."""
    external = os.environ.get("REDIS_CLUSTER_URL")
    if external:
        yield external
        return
    cli = require_binary("redis-cli")
    root = tmp_path_factory.mktemp("cluster")
    servers: list[RedisServer] = []
    try:
        for index in range(3):
            workdir = root / f"node-{index}"
            port = free_port(with_bus=True)
            config = str(workdir / f"nodes-{port}.conf")
            args = ("--cluster-enabled", "yes", "--cluster-config-file", config)
            server = RedisServer(workdir, *args, port=port)
            server.start()
            servers.append(server)
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        for server in servers:
            wait_until(
                functools.partial(_cluster_ok, server.port),
                timeout=READY_TIMEOUT,
                what=f"cluster_state:ok on port {server.port}",
            )
        yield servers[0].url
    finally:
        for server in servers:
            server.stop()


def _cluster_ok(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
    try:
        info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return bool(info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 3)


class Deliveries:
    """A delivery handler that records publications and lets tests await them."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self._changed = asyncio.Event()

    def __call__(self, publication: Publication) -> None:
        self.publications.append(publication)
        self._changed.set()

    def in_room(self, room: str) -> list[Publication]:
        return [p for p in self.publications if p.room == room]

    async def wait_for(self, count: int, *, room: str | None = None, timeout: float = 5.0) -> None:
        """Wait until ``count`` publications (of ``room``, if given) arrived."""

        def seen() -> int:
            return len(self.publications if room is None else self.in_room(room))

        try:
            async with asyncio.timeout(timeout):
                while seen() < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"got {seen()} of {count} publications within {timeout}s")


async def eventually(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str) -> None:
    """Poll ``predicate`` (without blocking the loop) until it holds or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
