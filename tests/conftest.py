"""Real ``roomcast serve`` processes, tokens, and the Node scripts that drive socket.io-client.

- ``roomcast_factory`` starts servers for one test, ``module_roomcast_factory`` for a module;
  ``roomcast_server`` is one shared per module. All load the test app of
  ``tests/interop/app_for_tests.py`` unless told otherwise. Servers listen on free ports,
  are waited for (their ready line, then ``/readyz``) under a deadline, and are killed at
  teardown; a failing test's report carries what they wrote on stderr meanwhile.
- ``mint`` signs tokens in-process with the session's secret; ``expired_token`` makes one whose
  ``exp`` has passed.
- ``node_scripts`` runs ``tests/interop/*.mjs`` (``npm ci`` first when ``node_modules`` is
  missing). Without ``node`` or ``npm`` those tests skip, or FAIL when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from redis_fixtures import free_port, require_binary
from roomcast.auth import Authenticator, AuthSettings

TESTS_DIR = Path(__file__).resolve().parent
INTEROP_DIR = TESTS_DIR / "interop"
READY_TIMEOUT = 20.0
"""Seconds a server has to print its ready line and answer ``/readyz``."""
STOP_TIMEOUT = 10.0
READY_LINE = "roomcast ready on "
_LOG_LIMIT = 20_000
"""Characters of a server's stderr shown in a failing test's report."""


# --------------------------------------------------------------------------- helpers


def http_json(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """Send one request; return the status and the decoded JSON body (None if not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True, slots=True)
class Credentials:
    """The secrets every server of this session is started with."""

    jwt_secret: str
    api_key: str


_SERVERS: list[RoomcastServer] = []
"""Every server started in this session, so failing tests can show their logs."""
_LOG_MARKS = pytest.StashKey[dict[int, int]]()


class RoomcastServer:
    """One ``roomcast serve`` process on 127.0.0.1, restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        credentials: Credentials,
        *args: str,
        app: str | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.credentials = credentials
        self.args = args
        self.app = app
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.stdout_path.touch()
        self.stderr_path.touch()
        _SERVERS.append(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # The secrets travel in the environment (ROOMCAST_JWT_SECRET, ROOMCAST_API_KEY).
        command = [sys.executable, "-m", "roomcast", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--drain-seconds", "1"]
        # Clients told to leave at once: tests that want a gradual drain pass these again.
        command += ["--drain-delay-s", "0", "--drain-window-s", "0"]
        if self.app:
            command += ["--app", self.app]
        return [*command, *self.args]

    def start(self) -> None:
        """Start the process and wait until it says it is ready and ``/readyz`` agrees."""
        if self.process is not None:
            raise RuntimeError(f"roomcast on port {self.port} is already running")
        for _attempt in range(3):
            if self._launch():
                return
            # The port chosen for us was taken meanwhile: try another one.
            self.port = free_port()
        pytest.fail(f"roomcast found no free port to start on\n{self.stderr()}")

    def _launch(self) -> bool:
        # Only the settings given here: none inherited from the developer's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(INTEROP_DIR), env.get("PYTHONPATH", "")) if p
        )
        # Not argv: a value that starts with "-" would be taken for an option there.
        env["ROOMCAST_JWT_SECRET"] = self.credentials.jwt_secret
        env["ROOMCAST_API_KEY"] = self.credentials.api_key
        stdout_offset = self.stdout_path.stat().st_size
        stderr_offset = self.stderr_path.stat().st_size
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
            )
        process = self.process
        deadline = time.monotonic() + READY_TIMEOUT
        while READY_LINE not in self._read(self.stdout_path, stdout_offset):
            if process.poll() is not None:
                self.process = None
                log = self._read(self.stderr_path, stderr_offset)
                if not self._fixed_port and "address already in use" in log.lower():
                    return False
                pytest.fail(f"roomcast exited with {process.returncode} while starting:\n{log}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"roomcast printed no ready line within {READY_TIMEOUT}s")
            time.sleep(0.01)
        while http_json("GET", f"{self.url}/readyz", timeout=1.0)[0] != 200:
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"roomcast /readyz did not answer 200 within {READY_TIMEOUT}s")
            time.sleep(0.01)
        return True

    @staticmethod
    def _read(path: Path, offset: int) -> str:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def stderr(self, since: int = 0) -> str:
        """What the server wrote on stderr from byte ``since`` on (the end, if long)."""
        text = self._read(self.stderr_path, since)
        return text if len(text) <= _LOG_LIMIT else "...\n" + text[-_LOG_LIMIT:]

    def kill(self) -> None:
        """SIGKILL: a crash that says goodbye to no client."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (a graceful drain by default) and wait for the exit; return its code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"roomcast on port {self.port} ignored {sig.name} for {timeout}s")

    def restart(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop the process with ``sig`` and start a new one on the same port."""
        if sig is signal.SIGKILL:
            self.kill()
        else:
            self.stop(sig)
        self._fixed_port = True
        self.start()

    def publish(
        self, room: str, event: str, data: Any, *, api_key: str | None = None
    ) -> tuple[int, Any]:
        """``POST /api/v1/publish``; return the status and JSON body."""
        key = self.credentials.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"room": room, "event": event, "data": data}
        return http_json("POST", f"{self.url}/api/v1/publish", body, headers)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember how much each server had logged when this test started."""
    item.stash[_LOG_MARKS] = {id(s): s.stderr_path.stat().st_size for s in _SERVERS}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach to a failing test's report what the servers logged while it ran."""
    report: pytest.TestReport = yield
    if report.failed:
        marks = item.stash.get(_LOG_MARKS, {})
        for server in _SERVERS:
            text = server.stderr(marks.get(id(server), 0))
            if text:
                report.sections.append((f"roomcast :{server.port} stderr", text))
    return report


@pytest.fixture(scope="session")
def credentials() -> Credentials:
    """A fresh JWT secret (HS256 needs >= 32 bytes) and API key for this session."""
    return Credentials(jwt_secret=secrets.token_urlsafe(48), api_key=secrets.token_urlsafe(24))


@pytest.fixture(scope="session")
def authenticator(credentials: Credentials) -> Authenticator:
    return Authenticator(AuthSettings(secret=credentials.jwt_secret))


Mint = Callable[..., str]


@pytest.fixture(scope="session")
def mint(authenticator: Authenticator) -> Mint:
    """``mint(sub, rooms, publish=(), ttl=600)``: a token the session's servers accept."""

    def make(
        sub: str = "alice",
        rooms: Sequence[str] = ("doc:*", "team:7:*"),
        publish: Sequence[str] = (),
        ttl: int = 600,
    ) -> str:
        return authenticator.mint(sub, list(rooms), list(publish), ttl_seconds=ttl)

    return make


@pytest.fixture(scope="session")
def expired_token(credentials: Credentials) -> str:
    """A correctly signed token whose ``exp`` passed a minute ago."""
    now = int(time.time())
    claims = {"sub": "late", "rooms": ["*"], "iat": now - 120, "exp": now - 60}
    return jwt.encode(claims, credentials.jwt_secret, algorithm="HS256")


ServerFactory = Callable[..., RoomcastServer]
"""``factory(*extra_args, app="app_for_tests:app")`` starts a server and returns it."""


def _server_factory(
    root: Path, credentials: Credentials
) -> tuple[ServerFactory, list[RoomcastServer]]:
    servers: list[RoomcastServer] = []

    def factory(*args: str, app: str | None = "app_for_tests:app") -> RoomcastServer:
        server = RoomcastServer(root / f"roomcast-{len(servers)}", credentials, *args, app=app)
        servers.append(server)
        server.start()
        return server

    return factory, servers


@pytest.fixture
def roomcast_factory(tmp_path: Path, credentials: Credentials) -> Iterator[ServerFactory]:
    """Start servers private to one test (to kill or restart); all killed at teardown."""
    factory, servers = _server_factory(tmp_path, credentials)
    yield factory
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def module_roomcast_factory(
    tmp_path_factory: pytest.TempPathFactory, credentials: Credentials
) -> Iterator[ServerFactory]:
    """Start servers shared by a module's tests; all killed when the module is done."""
    factory, servers = _server_factory(tmp_path_factory.mktemp("roomcast"), credentials)
    yield factory
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def roomcast_server(module_roomcast_factory: ServerFactory) -> RoomcastServer:
    """One server shared by a module's tests, with the test app loaded and any origin allowed."""
    return module_roomcast_factory("--allowed-origins", "*")


# --------------------------------------------------------------------------- node


@pytest.fixture(scope="session")
def node_binary() -> str:
    return require_binary("node")


@pytest.fixture(scope="session")
def interop_modules(node_binary: str) -> Path:
    """``tests/interop/node_modules``, installed once (``npm ci``) if it is missing."""
    modules = INTEROP_DIR / "node_modules"
    if (modules / "socket.io-client" / "package.json").is_file():
        return modules
    npm = require_binary("npm")
    verb = "ci" if (INTEROP_DIR / "package-lock.json").is_file() else "install"
    result = subprocess.run(
        [npm, verb, "--no-audit", "--no-fund"],
        cwd=INTEROP_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm {verb} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return modules


class NodeScriptError(AssertionError):
    """A Node script failed, timed out, or broke the output protocol of ``lib.mjs``."""


class NodeRun:
    """A running ``node tests/interop/SCRIPT.mjs '<config json>'`` and its JSON lines."""

    def __init__(self, node: str, script: str, config: dict[str, Any], timeout: float) -> None:
        self.script = script
        self.timeout = timeout
        self.lines: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self.process = subprocess.Popen(
            [node, str(INTEROP_DIR / script), json.dumps(config)],
            cwd=INTEROP_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._deadline = time.monotonic() + timeout
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"{script}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"{script}-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                value = json.loads(line)
            except ValueError:
                value = {"unparsed": line.rstrip("\n")}
            self._queue.put(value if isinstance(value, dict) else {"unparsed": value})
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    def _fail(self, why: str) -> NodeScriptError:
        self.close()
        shown = "\n".join(json.dumps(line) for line in self.lines[-20:])
        return NodeScriptError(
            f"{self.script}: {why}\nstdout:\n{shown}\nstderr:\n{''.join(self._stderr)[-4000:]}"
        )

    def _next(self) -> dict[str, Any] | None:
        remaining = self._deadline - time.monotonic()
        try:
            line = self._queue.get(timeout=max(remaining, 0.0))
        except queue.Empty:
            raise self._fail(f"no output within {self.timeout}s") from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_step(self, name: str) -> dict[str, Any]:
        """Wait for the progress line ``{"step": name, ...}`` and return it."""
        while True:
            line = self._next()
            if line is None or "ok" in line:
                raise self._fail(f"ended before step {name!r}")
            if line.get("step") == name:
                return line

    def outcome(self) -> dict[str, Any]:
        """Wait for the final line ``{"ok": ...}`` and the exit; return that line."""
        while True:
            line = self._next()
            if line is None:
                raise self._fail("ended without a result line")
            if "ok" in line:
                break
        try:
            self.process.wait(timeout=max(self._deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            raise self._fail("did not exit after its result line") from None
        self.close()
        return line

    def result(self) -> dict[str, Any]:
        """The script's result; fail the test with its output when it reported an error."""
        line = self.outcome()
        if line.get("ok") is not True:
            raise self._fail(f"failed in step {line.get('step')!r}: {line.get('error')}")
        result: dict[str, Any] = line["result"]
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class NodeScripts:
    """Starts the scripts of ``tests/interop``; every run still alive is killed by close()."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.runs: list[NodeRun] = []

    def start(self, script: str, config: dict[str, Any], *, timeout: float = 15.0) -> NodeRun:
        run = NodeRun(self.node, script, config, timeout)
        self.runs.append(run)
        return run

    def run(self, script: str, config: dict[str, Any], *, timeout: float = 15.0) -> dict[str, Any]:
        """Run ``script`` to its end and return its result."""
        return self.start(script, config, timeout=timeout).result()

    def close(self) -> None:
        for run in self.runs:
            run.close()


@pytest.fixture(scope="module")
def node_scripts(node_binary: str, interop_modules: Path) -> Iterator[NodeScripts]:
    """Runs the interop scripts; a run a failing test left behind is killed with its module."""
    scripts = NodeScripts(node_binary)
    yield scripts
    scripts.close()
