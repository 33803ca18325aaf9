"""Debian's HAProxy in front of Roomcast instances, configured as a user would.

``haproxy(backends)`` starts ``haproxy`` on a free port with health checks on ``/readyz``,
cookie stickiness for long-polling and a stats socket; the test reads the server states through
the stats socket (``show stat``) and every health transition from HAProxy's log, which goes to
its stdout. Without ``haproxy`` the tests skip, or FAIL when the ``CI`` variable is set.
"""

from __future__ import annotations

import csv
import io
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from process_output import ProcessOutput

from redis_fixtures import free_port, require_binary, wait_until

BACKEND = "roomcast"

CONFIG = """\
global
    log stdout format raw local0 info
    stats socket {stats} mode 600 level admin
    maxconn 8000

defaults
    mode http
    log global
    option dontlog-normal
    timeout connect 2s
    # longer than pingInterval + pingTimeout: a held poll or a quiet WebSocket is not cut
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout check {timeout_check}

frontend gateway
    bind 127.0.0.1:{port}
    option forwardfor
    default_backend {backend}

backend {backend}
    balance leastconn
    # Long-polling: every request of a session must reach the instance that holds it. The
    # cookie names the instance; 'option persist' keeps a session's requests on an instance
    # that is draining (out of the balance, still serving it), 'option redispatch' sends them
    # elsewhere once it is gone, where the client reconnects and recovers.
    cookie roomcast_server insert indirect nocache httponly
    option persist
    option redispatch
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter {inter} fall {fall} rise {rise}
{servers}
"""

_TRANSITION = re.compile(
    r"Server (?P<backend>[\w-]+)/(?P<server>[\w-]+) is (?P<state>UP|DOWN), reason: (?P<reason>[^,]+)"
    r"(?:, code: (?P<code>\d+))?.*?(?P<active>\d+) active and (?P<backup>\d+) backup servers"
)


@dataclass(frozen=True, slots=True)
class Transition:
    """One health transition from HAProxy's log: ``server`` went ``UP`` or ``DOWN``."""

    at: float
    """``time.monotonic()`` when the test read the line (HAProxy logs without delay)."""
    server: str
    state: str
    reason: str
    """``Layer7 wrong status``, ``Layer4 connection problem``, ``Layer7 check passed``, ..."""
    code: int | None
    """The HTTP status of a Layer 7 check."""
    active_left: int
    """Servers UP in the backend after this transition."""
    line: str


class HAProxy:
    """One ``haproxy -db`` process balancing ``backends`` (name -> port) on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        backends: dict[str, int],
        *,
        inter: str = "500ms",
        fall: int = 2,
        rise: int = 2,
        timeout_check: str = "1s",
    ) -> None:
        self.binary = require_binary("haproxy")
        self.port = free_port()
        self.stats_path = workdir / "haproxy.sock"
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} cookie {name}" for name, port in backends.items()
        )
        self.config = CONFIG.format(
            stats=self.stats_path,
            port=self.port,
            backend=BACKEND,
            servers=servers,
            inter=inter,
            fall=fall,
            rise=rise,
            timeout_check=timeout_check,
        )
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(self.config)
        self.process = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        self.output = ProcessOutput(self.process.stdout)

        def up() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
            return self.stats_path.exists() and _listening(self.port)

        wait_until(up, timeout=10, what="haproxy to listen")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.output.lines)

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``show servers state``)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> CSV row (status, check_status, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def healthy(self) -> set[str]:
        """The servers HAProxy sends new clients to (status ``UP``, also ``UP 1/2`` going down)."""
        return {name for name, row in self.servers().items() if row["status"].startswith("UP")}

    def wait_status(self, name: str, status: str, timeout: float) -> None:
        """Wait until ``show stat`` gives server ``name`` exactly ``status`` (``UP``, ``DOWN``)."""
        wait_until(
            lambda: self.servers()[name]["status"] == status,
            timeout=timeout,
            what=f"haproxy to see server {name} {status}",
        )

    def transitions(self) -> list[Transition]:
        """Every health transition logged so far, in order."""
        count = len(self.output.times)  # a line's time is stored before the line
        found = []
        for line, stamp in zip(self.output.lines[:count], self.output.times, strict=False):
            match = _TRANSITION.search(line)
            if match is None or line.startswith("["):  # the [WARNING] copy on stderr
                continue
            found.append(
                Transition(
                    at=stamp,
                    server=match["server"],
                    state=match["state"],
                    reason=match["reason"],
                    code=int(match["code"]) if match["code"] else None,
                    active_left=int(match["active"]),
                    line=line.strip(),
                )
            )
        return found

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


HAProxyFactory = Callable[..., HAProxy]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HAProxyFactory]:
    """``haproxy(backends, **options)``: a :class:`HAProxy`; all stopped at teardown."""
    started: list[HAProxy] = []

    def start(backends: dict[str, int], **options: object) -> HAProxy:
        workdir = tmp_path / f"haproxy-{len(started)}"
        workdir.mkdir()
        proxy = HAProxy(workdir, backends, **options)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()
