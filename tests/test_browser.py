"""The official socket.io-client browser bundle, in Debian's chromium, against ``roomcast serve``.

``tests/browser/driver.mjs`` (Node + playwright-core, which brings no browser of its own) opens
``tests/browser/page.html`` in chromium. The page is served by a small HTTP server of this module
on its own port, so it is another origin than Roomcast: its long-polling requests need CORS and
its WebSockets carry an ``Origin`` that Roomcast checks against ``--allowed-origins``. A second
page server, on an origin not in that list, is refused.

The page connects, joins a room and says so (``{"step": "ready"}``); the test then publishes five
``news`` events, a binary ``file`` event and a ``fence`` event over the HTTP API, the driver waits
for the fence, makes an ack round trip through the test app's ``echo`` handler, and prints what
the page saw.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from conftest import TESTS_DIR, NodeRun, require_binary

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer, ServerFactory

pytestmark = pytest.mark.interop

BROWSER_DIR = TESTS_DIR / "browser"
DRIVER = BROWSER_DIR / "driver.mjs"
BUNDLE = Path("socket.io-client") / "dist" / "socket.io.min.js"
DRIVER_TIMEOUT_MS = 15_000
"""The driver's own deadline; pytest waits a little longer, so the driver reports it first."""
EVENTS = [{"n": n, "text": f"héllo {n} ✓"} for n in range(5)]
ECHO = {"text": "ünïcode ✓", "list": [1, 2.5, None, True]}
FILE = bytes(range(256))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    return require_binary("chromium")


@pytest.fixture(scope="session")
def browser_modules(node_binary: str) -> Path:
    """``tests/browser/node_modules`` (playwright-core), installed once (``npm ci``) if missing."""
    modules = BROWSER_DIR / "node_modules"
    if (modules / "playwright-core" / "package.json").is_file():
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


class PageServer:
    """Serves ``page.html`` at ``/`` and the socket.io-client bundle on its own origin."""

    def __init__(self, bundle: Path) -> None:
        files = {
            "/": (BROWSER_DIR / "page.html", "text/html; charset=utf-8"),
            "/socket.io.min.js": (bundle, "text/javascript; charset=utf-8"),
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                entry = files.get(self.path.split("?", 1)[0])
                if entry is None:
                    self.send_error(404)
                    return
                body = entry[0].read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", entry[1])
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the browser's requests are not the test's concern

        # Port 0: the kernel picks a free port, with no window for anyone to take it.
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"page-server {self.origin}", daemon=True
        )
        self._thread.start()

    def url(self, config: dict[str, Any]) -> str:
        """The page's URL, configured by ``config`` in its fragment."""
        return f"{self.origin}/#{quote(json.dumps(config))}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def page_servers(interop_modules: Path) -> Iterator[tuple[PageServer, PageServer]]:
    """Two page servers: the first origin is allowed by ``server``, the second is not."""
    bundle = interop_modules / BUNDLE
    assert bundle.is_file(), f"{bundle} is missing from the interop modules"
    allowed, foreign = PageServer(bundle), PageServer(bundle)
    yield allowed, foreign
    allowed.close()
    foreign.close()


@pytest.fixture(scope="module")
def server(
    module_roomcast_factory: ServerFactory, page_servers: tuple[PageServer, PageServer]
) -> RoomcastServer:
    """A server that allows only the first page server's origin."""
    return module_roomcast_factory("--allowed-origins", page_servers[0].origin)


@pytest.fixture(scope="module")
def token(mint: Mint) -> str:
    return mint("browser", rooms=("doc:*",))


class DriverRun(NodeRun):
    """A run of ``driver.mjs``, stopped with SIGTERM first so that playwright-core closes chromium.

    A SIGKILL alone would leave the browser behind: it runs in a process group of its own.
    """

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        super().close()


StartDriver = Callable[..., DriverRun]


@pytest.fixture
def driver(
    node_binary: str,
    chromium_binary: str,
    browser_modules: Path,
    tmp_path: Path,
) -> Iterator[StartDriver]:
    """``driver(page_url, expect=..., **config)`` starts the driver with a fresh chromium profile."""
    runs: list[DriverRun] = []

    def start(page_url: str, **config: Any) -> DriverRun:
        config = {
            "pageUrl": page_url,
            "chromium": chromium_binary,
            "userDataDir": str(tmp_path / f"profile-{len(runs)}"),
            "timeoutMs": DRIVER_TIMEOUT_MS,
            **config,
        }
        # An absolute script path: NodeRun joins it to tests/interop, which keeps it as it is.
        run = DriverRun(node_binary, str(DRIVER), config, DRIVER_TIMEOUT_MS / 1000 + 5)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def _forbidden_requests(server: RoomcastServer) -> float:
    """The server's count of Engine.IO requests refused as forbidden (a bad origin among them)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = 'roomcast_engine_request_errors_total{code="forbidden"} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    return values[0] if values else 0.0


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("transports", "at_open", "upgrades", "final"),
    [
        pytest.param(None, "polling", ["websocket"], "websocket", id="default"),
        pytest.param(["websocket"], "websocket", [], "websocket", id="websocket-only"),
        pytest.param(["polling"], "polling", [], "polling", id="polling-only"),
    ],
)
def test_browser_receives_published_events(
    driver: StartDriver,
    page_servers: tuple[PageServer, PageServer],
    server: RoomcastServer,
    token: str,
    transports: list[str] | None,
    at_open: str,
    upgrades: list[str],
    final: str,
) -> None:
    """A browser page on an allowed origin connects, joins, gets five published events once each in order, a binary publication as an ArrayBuffer byte for byte, and an ack."""
    room = f"doc:browser-{'-'.join(transports or ['default'])}"
    page = {"url": server.url, "token": token, "room": room, "transports": transports}
    run = driver(page_servers[0].url(page), expect="fenced", echo=ECHO, awaitTransport=final)

    ready = run.wait_step("ready")
    assert ready["join"] == [{"ok": True}]
    assert ready["transports"]["open"] == at_open

    offsets = []
    for data in EVENTS:
        status, body = server.publish(room, "news", data)
        assert status == 202, body
        offsets.append(body["offset"])
    blob = {"name": "f.bin", "body": {"$binary": base64.b64encode(FILE).decode()}}
    status, body = server.publish(room, "file", blob)
    assert status == 202, body
    file_offset = body["offset"]
    status, body = server.publish(room, "fence", None)
    assert status == 202, body

    result = run.result()
    state = result["state"]
    assert state["events"] == [[data, offset] for data, offset in zip(EVENTS, offsets, strict=True)]
    received = {"name": "f.bin", "body": {"binary": "ArrayBuffer", "hex": FILE.hex()}}
    assert state["files"] == [[received, file_offset]]
    assert result["echo"] == [ECHO]
    assert state["upgrades"] == upgrades
    assert result["final"]["transport"] == final
    assert result["upgraded"] is True
    assert result["final"]["connected"] is True
    assert state["connectError"] is None


@pytest.mark.parametrize(
    ("transports", "message", "description"),
    [
        # The refusal (403) carries no CORS headers, so the page cannot read it: status 0.
        pytest.param(None, "xhr poll error", "0", id="default"),
        pytest.param(["websocket"], "websocket error", "Event error", id="websocket-only"),
    ],
)
def test_browser_on_foreign_origin_is_refused(
    driver: StartDriver,
    page_servers: tuple[PageServer, PageServer],
    server: RoomcastServer,
    token: str,
    transports: list[str] | None,
    message: str,
    description: str,
) -> None:
    """A page on an origin missing from ``--allowed-origins`` gets a connect_error, refused by the server."""
    before = _forbidden_requests(server)
    page = {"url": server.url, "token": token, "room": "doc:foreign", "transports": transports}
    result = driver(page_servers[1].url(page), expect="connect_error").result()

    state = result["state"]
    assert state["phase"] == "connect_error", result
    assert state["connectError"] == {
        "message": message,
        "type": "TransportError",
        "description": description,
        "data": None,
    }, result
    assert state["transports"]["connect"] is None
    # Refused by Roomcast itself, not only hidden from the page by the browser's CORS check.
    assert _forbidden_requests(server) > before
