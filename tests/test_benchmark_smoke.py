"""Smoke test of the benchmark harness (benchmarks/run.py --smoke).

Runs every scenario at CI size against all three servers (Roomcast, the
reference Node socket.io server, Roomcast --workers 2) and checks that each one
delivered messages and lost none. No timing assertions: the numbers of a shared
CI machine are not meaningful, only that the harness and the servers work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_PY = REPO_ROOT / "benchmarks" / "run.py"
SERVERS = ("roomcast", "node", "roomcast-w2")


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="the benchmark harness needs Node.js and npm",
)
def test_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "--smoke", "--json-out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    stdout, stderr = proc.stdout[-6000:], proc.stderr[-6000:]
    detail = f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert out.is_file(), detail
    report = json.loads(out.read_text())
    scenarios = {sc["scenario"]["name"]: sc["results"] for sc in report["scenarios"]}
    assert set(scenarios) == {"saturated", "collab", "bigroom"}, detail
    for name, results in scenarios.items():
        for server in SERVERS:
            result = results.get(server)
            assert result is not None, f"{name}/{server} missing\n{detail}"
            assert "error" not in result, f"{name}/{server}: {result.get('error')}"
            assert result["delivered"] > 0, f"{name}/{server} delivered nothing\n{detail}"
            assert result["lost"] == 0, f"{name}/{server} lost {result['lost']}\n{detail}"
    assert proc.returncode == 0, detail
