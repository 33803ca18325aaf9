"""The Socket.IO Admin UI's own files (``@socket.io/admin-ui`` 0.5.1 from npm, its ``ui/dist``)
in Debian's chromium, against ``roomcast serve`` with the admin namespace enabled.

The UI is served by a small HTTP server of this module on its own origin, which the gateway
allows (``--allowed-origins``): the UI connects across origins as it does when hosted anywhere.
``tests/browser/admin_ui.mjs`` drives it (playwright-core): a wrong password gets the form's
"Invalid credentials"; then it logs in, lists a socket that was there, sees one that connects
after it, makes that one join a room and disconnects it from the socket's page, and a reload
logs in again with the session id the UI kept.  Each step is checked on the server and on the
client too.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import mimetypes
import queue
import secrets
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bcrypt
import multi_fixtures
import pytest
from conftest import TESTS_DIR, http_json, require_binary
from multi_fixtures import NodeClients, metric, publish_ok

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer, ServerFactory

pytestmark = pytest.mark.interop

node_clients = multi_fixtures.node_clients

BROWSER_DIR = TESTS_DIR / "browser"
DRIVER = BROWSER_DIR / "admin_ui.mjs"
UI_DIST = Path("@socket.io") / "admin-ui" / "ui" / "dist"
DRIVER_TIMEOUT_S = 60.0
PASSWORD = secrets.token_urlsafe(12)
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
ROOM = "ui:room-1"


class StaticServer:
    """Serves a directory (the UI's ``dist``) on an origin of its own."""

    def __init__(self, root: Path) -> None:
        root = root.resolve()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                target = (root / path.lstrip("/")).resolve()
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_relative_to(root) or not target.is_file():
                    self.send_error(404)
                    return
                body = target.read_bytes()
                kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"ui-server {self.origin}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class Driver:
    """``node admin_ui.mjs``: its JSON lines, and lines written to its stdin."""

    def __init__(self, node: str, config: dict[str, Any]) -> None:
        self.lines: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self.process = subprocess.Popen(
            [node, str(DRIVER), json.dumps(config)],
            cwd=BROWSER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._deadline = time.monotonic() + DRIVER_TIMEOUT_S + 10
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, stdout: bool) -> None:
        for line in stream:
            if not stdout:
                self._stderr.append(line)
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = {"unparsed": line.rstrip("\n")}
            self._queue.put(value if isinstance(value, dict) else {"unparsed": value})
        if stdout:
            self._queue.put(None)

    def _fail(self, why: str) -> AssertionError:
        shown = "\n".join(json.dumps(line)[:2000] for line in self.lines[-10:])
        return AssertionError(
            f"admin_ui.mjs: {why}\nstdout:\n{shown}\nstderr:\n{''.join(self._stderr)[-4000:]}"
        )

    def step(self, name: str) -> dict[str, Any]:
        """Wait for ``{"step": name}``; fail with the driver's output if it ends first."""
        while True:
            try:
                line = self._queue.get(timeout=max(self._deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise self._fail(f"no step {name!r} in time") from None
            if line is None:
                raise self._fail(f"ended before step {name!r}")
            self.lines.append(line)
            if "ok" in line:
                raise self._fail(f"finished before step {name!r}")
            if line.get("step") == name:
                return line

    def send(self, value: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(value) + "\n")
        self.process.stdin.flush()

    def result(self) -> dict[str, Any]:
        while True:
            try:
                line = self._queue.get(timeout=max(self._deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise self._fail("no result in time") from None
            if line is None:
                raise self._fail("ended without a result")
            self.lines.append(line)
            if "ok" in line:
                if line["ok"] is not True:
                    raise self._fail(f"failed in step {line.get('step')}: {line.get('error')}")
                result: dict[str, Any] = line["result"]
                return result

    def close(self) -> None:
        """SIGTERM first, so that playwright-core closes chromium (its own process group)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    return require_binary("chromium")


@pytest.fixture(scope="session")
def ui_modules(node_binary: str) -> Path:
    """``tests/browser/node_modules`` with the Admin UI, installed (``npm ci``) if missing."""
    modules = BROWSER_DIR / "node_modules"
    wanted = (modules / UI_DIST / "index.html", modules / "@mdi" / "font" / "css")
    if all(path.exists() for path in wanted):
        return modules
    npm = require_binary("npm")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=BROWSER_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return modules


@pytest.fixture
def ui_server(ui_modules: Path) -> Iterator[StaticServer]:
    server = StaticServer(ui_modules / UI_DIST)
    yield server
    server.close()


@pytest.fixture
def driver(
    node_binary: str, chromium_binary: str, ui_modules: Path, tmp_path: Path
) -> Iterator[Any]:
    drivers: list[Driver] = []

    def start(**config: Any) -> Driver:
        run = Driver(
            node_binary,
            {
                "chromium": chromium_binary,
                "userDataDir": str(tmp_path / f"profile-{len(drivers)}"),
                "timeoutMs": int(DRIVER_TIMEOUT_S * 1000),
                **config,
            },
        )
        drivers.append(run)
        return run

    yield start
    for run in drivers:
        run.close()


def sockets_in(server: RoomcastServer, room: str) -> set[str]:
    headers = {"Authorization": f"Bearer {server.credentials.api_key}"}
    status, body = http_json(
        "GET", f"{server.url}/api/v1/sockets?room={urllib.parse.quote(room)}", None, headers
    )
    assert status == 200, body
    return {s["id"] for s in body["sockets"]}


# --------------------------------------------------------------------------- test


def test_admin_ui_in_chromium(
    roomcast_factory: ServerFactory,
    ui_server: StaticServer,
    driver: Any,
    node_clients: NodeClients,
    mint: Mint,
) -> None:
    """The Admin UI logs in (not with a wrong password), lists a socket, sees a new one
    appear, makes it join a room and disconnects it, and logs in again after a reload with
    its session id alone."""
    server = roomcast_factory(
        "--allowed-origins",
        ui_server.origin,
        "--admin-username",
        "admin",
        "--admin-password-hash",
        HASH,
        app=None,
    )
    rooms = ("ui:**",)
    early = node_clients.connect("early", server.url, mint("early-user", rooms=rooms))["id"]
    run = driver(
        mode="flow",
        uiUrl=f"{ui_server.origin}/",
        serverUrl=server.url,
        username="admin",
        password=PASSWORD,
        badPassword=PASSWORD + "-wrong",
        earlyId=early,
        room=ROOM,
    )
    run.step("refused")
    watching = run.step("watching")
    assert early in watching["listed"]

    live = node_clients.connect("live", server.url, mint("live-user", rooms=rooms))["id"]
    run.send({"liveId": live})
    appeared = run.step("appeared")
    assert {early, live} <= set(appeared["listed"])

    joined = run.step("joined")
    assert ROOM in joined["rooms"]
    assert sockets_in(server, ROOM) == {live}
    publish_ok(server, ROOM, "after-join", {"n": 1})
    assert node_clients.wait_events("live", until="after-join")[-1]["data"] == {"n": 1}
    run.send({})

    run.step("disconnected")
    assert node_clients.wait_disconnects("live", 1) == ["io server disconnect"]
    assert node_clients.state("early")["connected"] is True
    reused = run.step("reused")
    assert reused["session"] is True
    run.result()
    assert metric(server, 'roomcast_admin_logins_total{result="refused"}') == 1
    assert metric(server, 'roomcast_admin_logins_total{result="password"}') == 1
    assert metric(server, 'roomcast_admin_logins_total{result="session"}') == 1
    assert metric(server, 'roomcast_admin_actions_total{action="join",result="done"}') == 1
    assert metric(server, 'roomcast_admin_actions_total{action="disconnect",result="done"}') == 1
