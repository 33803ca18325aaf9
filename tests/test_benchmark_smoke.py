"""Smoke test of the benchmark harness (benchmarks/run.py --smoke).

Runs every scenario at CI size against every server (Roomcast, the reference
Node socket.io server, Roomcast on Redis, Roomcast --workers 2) and checks that
each one delivered messages and lost none. No timing assertions: the numbers of a shared
CI machine are not meaningful, only that the harness and the servers work.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from redis_fixtures import require_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_PY = REPO_ROOT / "benchmarks" / "run.py"
SERVERS = ("roomcast", "node", "roomcast-redis", "roomcast-w2")


def test_benchmark_smoke(tmp_path: Path) -> None:
    for binary in ("node", "npm", "redis-server"):  # skipped locally without them, fails on CI
        require_binary(binary)
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
            for field in (
                "duplicates",
                "misrouted",
                "publish_errors",
                "connect_failed",
                "join_failed",
            ):
                assert result[field] == 0, f"{name}/{server}: {field} {result[field]}\n{detail}"
        moved = results["roomcast-w2"]
        assert moved["handoffs_failed"] == 0, f"{name}: handoffs failed\n{detail}"
        assert moved["handoffs_sent"] + moved["handoffs_kept"] > 0, f"{name}: no move\n{detail}"
    assert proc.returncode == 0, detail


def test_repeated_rounds_report_medians_and_the_worst_losses() -> None:
    """--repeat: each figure is the median of the rounds, a failure count the worst round's."""
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = run  # dataclasses look their module up while the class is built
    spec.loader.exec_module(run)
    rounds = [
        {"latency_p95_ms": 10.0, "lost": 0, "delivered": 100, "note": "a"},
        {"latency_p95_ms": 30.0, "lost": 2, "delivered": 98, "note": "b"},
        {"latency_p95_ms": 20.0, "lost": 0, "delivered": 100, "note": "c"},
    ]
    merged = run.combine_rounds(rounds)
    assert merged["latency_p95_ms"] == 20.0
    assert merged["delivered"] == 100
    assert merged["lost"] == 2
    assert merged["note"] == "a" and merged["rounds"] == rounds
    failed = run.combine_rounds([rounds[0], {"error": "boom"}])
    assert failed["error"] == "1 of 2 rounds failed: boom"
    assert run.combine_rounds([rounds[1]]) is rounds[1]
