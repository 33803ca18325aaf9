"""The official Engine.IO v4 and Socket.IO v5 test suites, unmodified, against
``examples/protocol_suites.py``: they must pass 25/25 and 32/32.

The suites live outside the repository, in ``../shared/conformance`` (or
``ROOMCAST_CONFORMANCE_DIR``), read-only: each run copies one to a temporary folder, points its
``const URL`` line at a free port, installs its pinned dependencies and runs mocha there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from redis_fixtures import free_port, require_binary

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"engine.io-v4": 25, "socket.io-v5": 32}


def _conformance_dir() -> Path:
    folder = Path(
        os.environ.get("ROOMCAST_CONFORMANCE_DIR", ROOT.parent / "shared" / "conformance")
    )
    if not all((folder / suite / "test-suite.js").is_file() for suite in SUITES):
        message = f"the official suites are not in {folder} (set ROOMCAST_CONFORMANCE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def _wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the example server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the example server did not listen on {port} within {timeout} s")


@pytest.mark.interop
@pytest.mark.timeout(600)
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_official_suite_passes_every_test(suite: str, tmp_path: Path) -> None:
    """Every test of the official suite passes, and the suite ran as many as it has."""
    source = _conformance_dir() / suite
    npm = require_binary("npm")
    require_binary("node")
    work = tmp_path / suite
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("node_modules"))
    port = free_port()
    script = work / "test-suite.js"
    text, count = re.subn(
        r'^const URL = "[^"]*";$',
        f'const URL = "http://127.0.0.1:{port}";',
        script.read_text(),
        flags=re.M,
    )
    assert count == 1, "the suite's `const URL` line was not found"
    script.write_text(text)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "protocol_suites.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_port(port, server, 30)
        result = subprocess.run(
            [str(work / "node_modules" / ".bin" / "mocha"), "--reporter", "json", "test-suite.js"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.terminate()
        log, _ = server.communicate(timeout=30)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"mocha printed no JSON report:\n{result.stdout}\n{result.stderr}")
    stats = report["stats"]
    failures = [f"{t['fullTitle']}: {t['err'].get('message')}" for t in report["failures"]]
    detail = "\n".join(failures) + "\n--- server log (tail) ---\n" + log[-3000:]
    assert stats["failures"] == 0, detail
    assert (stats["tests"], stats["passes"]) == (SUITES[suite], SUITES[suite]), detail
