"""Several ``roomcast serve`` instances on one Redis, the clients that talk to them, and a proxy.

Test modules import what they use (``from multi_fixtures import ...``), fixtures included.

- ``gateways(count, *args)`` starts instances in parallel (they are CPU-bound while starting)
  with the session's credentials; all are killed at teardown.
- ``node_clients`` is one Node process (``tests/interop/mi_clients.mjs``) holding any number of
  official socket.io-client sockets, driven by JSON commands; see :class:`NodeClients`.
- ``tcp_proxy(target_port)`` is a TCP proxy the test controls (:class:`TcpProxy`): it can cut
  every connection, refuse new ones, and send new ones to another backend.
- ``xadd_publication`` appends an envelope with a plain ``XADD``, as a non-Roomcast service would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from conftest import INTEROP_DIR, Credentials, RoomcastServer, http_json

T = TypeVar("T")

CLIENTS_SCRIPT = INTEROP_DIR / "mi_clients.mjs"


# --------------------------------------------------------------------------- gateways

GatewayFactory = Callable[..., list[RoomcastServer]]


def redis_args(url: str, prefix: str, *extra: str) -> tuple[str, ...]:
    """The ``serve`` flags of an instance of the Redis-backed deployment ``prefix``."""
    return ("--redis-url", url, "--redis-prefix", prefix, *extra)


@pytest.fixture
def gateways(tmp_path: Path, credentials: Credentials) -> Iterator[GatewayFactory]:
    """``gateways(count, *args)``: start ``count`` instances at once; all killed at teardown."""
    started: list[RoomcastServer] = []

    def start(count: int, *args: str) -> list[RoomcastServer]:
        servers = [
            RoomcastServer(tmp_path / f"gateway-{len(started) + index}", credentials, *args)
            for index in range(count)
        ]
        started.extend(servers)
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="gateway-start") as pool:
            for future in [pool.submit(server.start) for server in servers]:
                future.result()
        return servers

    yield start
    for server in started:
        server.kill()


def metric(server: RoomcastServer, name: str) -> float:
    """The value of the sample ``name`` (labels included: ``x_total{a="b"}``) on ``/metrics``."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if found is None:
        pytest.fail(f"{server.url}/metrics has no sample {name!r}")
    return float(found.group(1))


def readyz(server: RoomcastServer) -> tuple[int, Any]:
    return http_json("GET", f"{server.url}/readyz", timeout=2.0)


def publish(
    server: RoomcastServer,
    room: str,
    event: str,
    data: Any,
    *,
    idempotency_key: str | None = None,
) -> tuple[int, Any]:
    """``POST /api/v1/publish`` on ``server`` with the session's API key."""
    body: dict[str, Any] = {"room": room, "event": event, "data": data}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    headers = {"Authorization": f"Bearer {server.credentials.api_key}"}
    return http_json("POST", f"{server.url}/api/v1/publish", body, headers)


def publish_ok(server: RoomcastServer, room: str, event: str, data: Any) -> dict[str, Any]:
    """Publish and fail the test unless the answer is ``202``; return the answer's body."""
    status, body = publish(server, room, event, data)
    assert status == 202, (status, body)
    result: dict[str, Any] = body
    return result


def room_key(prefix: str, room: str) -> str:
    """The room's stream, as docs/redis.md names it (not computed by Roomcast's own code)."""
    return f"{prefix}:room:{{{room}}}"


def xadd_publication(client: redis.Redis, prefix: str, room: str, event: str, data: Any) -> str:
    """Append an envelope with a plain ``XADD`` (no script, no TTL); return the entry id."""
    fields = {
        "room": room,
        "event": event,
        "data": json.dumps(data),
        "id": uuid.uuid4().hex,
        "published_at": str(int(time.time() * 1000)),
    }
    entry_id = client.xadd(room_key(prefix, room), fields)  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


# --------------------------------------------------------------------------- node clients


class ClientsError(AssertionError):
    """A command of ``mi_clients.mjs`` failed or timed out; the message carries its stderr."""


class NodeClients:
    """One ``node tests/interop/mi_clients.mjs`` process and the sockets it holds, by name."""

    def __init__(self, node: str, script: Path = CLIENTS_SCRIPT) -> None:
        """``script``: another script of ``tests/interop`` that speaks the same protocol."""
        self.script = script
        self.process = subprocess.Popen(
            [node, str(script)],
            cwd=INTEROP_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}
        self._other: list[str] = []
        self._stderr: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._write_lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read_stdout, name="mi-clients-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="mi-clients-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            with self._changed:
                if isinstance(value, dict) and isinstance(value.get("id"), int):
                    self._answers[value["id"]] = value
                else:
                    self._other.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    def _error(self, why: str) -> ClientsError:
        other = "\n".join(self._other[-10:])
        stderr = "".join(self._stderr)[-4000:]
        return ClientsError(f"{self.script.name}: {why}\nother stdout:\n{other}\nstderr:\n{stderr}")

    def call(self, cmd: str, *, timeout: float = 15.0, **args: Any) -> Any:
        """Run one command and return its result; raise :class:`ClientsError` otherwise."""
        command_id = next(self._ids)
        line = json.dumps({"id": command_id, "cmd": cmd, **args})
        assert self.process.stdin is not None
        with self._write_lock:
            try:
                self.process.stdin.write(line + "\n")
                self.process.stdin.flush()
            except OSError as exc:
                raise self._error(f"cannot send {cmd}: {exc}") from exc
        deadline = time.monotonic() + timeout
        with self._changed:
            while command_id not in self._answers:
                remaining = deadline - time.monotonic()
                if self._ended:
                    raise self._error(f"exited before answering {cmd}")
                if remaining <= 0:
                    raise self._error(f"no answer to {cmd} within {timeout}s")
                self._changed.wait(remaining)
            answer = self._answers.pop(command_id)
        if answer.get("ok") is not True:
            raise self._error(f"{cmd} {json.dumps(args)[:300]} failed: {answer.get('error')}")
        return answer.get("result")

    # -- one method per command -------------------------------------------------------------
    def connect(self, name: str, url: str, token: str, **options: Any) -> dict[str, Any]:
        """Connect socket ``name`` (socket.io-client ``options`` on top of no reconnection)."""
        result: dict[str, Any] = self.call(
            "connect", name=name, url=url, token=token, options=options
        )
        return result

    def emit(self, name: str, event: str, *args: Any, timeout: float = 8.0) -> list[Any]:
        """Emit with an ack; return the ack's arguments."""
        answer: list[Any] = self.call(
            "emit",
            name=name,
            event=event,
            args=list(args),
            timeoutMs=int(timeout * 1000),
            timeout=timeout + 5,
        )
        return answer

    def send(self, name: str, event: str, *args: Any, count: int = 1) -> None:
        """Emit ``count`` times without an ack (the events are on their way on return)."""
        self.call("send", name=name, event=event, args=list(args), count=count)

    def answer(self, name: str, event: str, value: Any) -> None:
        """From now on, ``name`` acks the server's ``event`` with ``value``."""
        self.call("answer", name=name, event=event, value=value)

    def join(self, name: str, room: str) -> None:
        """Join ``room`` and fail the test unless the ack is ``{ok: true}``."""
        answer = self.emit(name, "join", room)
        assert answer == [{"ok": True}], f"{name} joining {room}: {answer}"

    def wait_events(
        self, name: str, count: int = 0, *, until: str | None = None, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Every event ``name`` received, once there are ``count`` (and one named ``until``).

        An event is ``{event, data, offset, n (arguments), connection (connects before it)}``.
        """
        events: list[dict[str, Any]] = self.call(
            "waitEvents",
            name=name,
            count=count,
            untilEvent=until,
            timeoutMs=int(timeout * 1000),
            timeout=timeout + 5,
        )
        return events

    def wait_event(
        self, name: str, event: str, contains: str = "", *, after: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first event ``event`` of ``name`` at index ``after`` or later whose arguments,
        as JSON, contain ``contains``: ``{index, event, args, ...}``."""
        found: dict[str, Any] = self.call(
            "waitEvent",
            name=name,
            event=event,
            contains=contains,
            after=after,
            timeoutMs=int(timeout * 1000),
            timeout=timeout + 5,
        )
        return found

    def wait_connects(
        self, name: str, count: int, *, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Every connect of ``name`` (``{id, recovered, transport}``), once there are ``count``."""
        connects: list[dict[str, Any]] = self.call(
            "waitConnects",
            name=name,
            count=count,
            timeoutMs=int(timeout * 1000),
            timeout=timeout + 5,
        )
        return connects

    def wait_disconnects(self, name: str, count: int, *, timeout: float = 10.0) -> list[str]:
        reasons: list[str] = self.call(
            "waitDisconnects",
            name=name,
            count=count,
            timeoutMs=int(timeout * 1000),
            timeout=timeout + 5,
        )
        return reasons

    def state(self, name: str) -> dict[str, Any]:
        """``{connected, id, recovered, events, connects, disconnects, connectErrors}``."""
        result: dict[str, Any] = self.call("state", name=name)
        return result

    def close_client(self, name: str) -> None:
        self.call("close", name=name)

    def close(self) -> None:
        """End the process (closing stdin ends it; killed if it lingers)."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def node_clients(node_binary: str, interop_modules: Path) -> Iterator[NodeClients]:
    """A fresh process of socket.io-client sockets for one test."""
    clients = NodeClients(node_binary)
    yield clients
    clients.close()


# --------------------------------------------------------------------------- proxy


class TcpProxy:
    """A TCP proxy from ``127.0.0.1:port`` to ``127.0.0.1:target`` on its own event loop thread.

    The port stays the same for the proxy's lifetime; the backend of new connections is
    ``target``, changed by :meth:`retarget`. :meth:`drop_all` aborts (RST) both sides of every
    current connection; while :meth:`pause` is in effect, new connections are aborted at once
    (a client sees a refused reconnect and tries again).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.paused = False
        self.accepted = 0
        self.refused = 0
        self._links: set[tuple[asyncio.WriteTransport, asyncio.WriteTransport]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy")
        self._thread.start()
        self._server = self._run(
            asyncio.start_server(self._handle, "127.0.0.1", 0, reuse_address=True)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(handler)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.paused:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        link = (writer.transport, up_writer.transport)
        self._links.add(link)
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer), name="proxy-up"),
            asyncio.create_task(_pipe(up_reader, writer), name="proxy-down"),
        ]
        try:
            # One side ended (a close, or a reset by drop_all or a dead backend): end both.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.close()
            up_writer.close()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._links.discard(link)

    async def _drop_all(self) -> int:
        links = list(self._links)
        for client_side, backend_side in links:
            client_side.abort()
            backend_side.abort()
        return len(links)

    def drop_all(self) -> int:
        """Abort both sides of every current connection; return how many there were."""
        return self._run(self._drop_all())

    async def _set(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def retarget(self, port: int) -> None:
        """Send new connections to ``127.0.0.1:port`` (current ones stay where they are)."""
        self._run(self._set(target=port))

    def pause(self) -> None:
        """Refuse new connections until :meth:`resume`."""
        self._run(self._set(paused=True))

    def resume(self) -> None:
        self._run(self._set(paused=False))

    def connections(self) -> int:
        return len(self._links)

    def close(self) -> None:
        async def shutdown() -> None:
            self.paused = True  # a client still reconnecting is turned away
            self._server.close()
            await self._server.wait_closed()
            await asyncio.sleep(0)  # handlers of connections accepted just now start
            await self._drop_all()
            # Every handler (and its pipes) ends once its connections are aborted.
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                _, pending = await asyncio.wait(others, timeout=5)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=5)
            # Aborted transports close their sockets in a callback: let those run.
            await asyncio.sleep(0)

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A reset ends the copy like an end of stream does: the caller then closes both sides.
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


ProxyFactory = Callable[[int], TcpProxy]


@pytest.fixture
def tcp_proxy() -> Iterator[ProxyFactory]:
    """``tcp_proxy(target_port)``: a :class:`TcpProxy`; all are closed at teardown."""
    proxies: list[TcpProxy] = []

    def make(target: int) -> TcpProxy:
        proxy = TcpProxy(target)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
