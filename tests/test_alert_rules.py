"""The Grafana dashboard and the Prometheus alerting rules in deploy/: every expression parses
(Debian's promtool), names only metrics Roomcast exports, and every alert fires and stays quiet
as its unit tests say (``promtool test rules``)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from test_node import _get

import redis_fixtures
from redis_fixtures import require_binary
from wire import running

redis_url = redis_fixtures.redis_url

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "roomcast-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "roomcast-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "roomcast.json"
METRIC_NAME = re.compile(r"\broomcast_[a-z_]+\b")
MERGED_ONLY = {"roomcast_worker_up"}
"""Samples the worker merge adds to /metrics with --workers N (roomcast/http/peers.py)."""


def fill_variables(expr: str, rate_interval: str) -> str:
    """A panel's expression as Grafana sends it with every variable at "All"."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$instance", ".*")
        .replace("$worker", ".*")
    )


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


async def _exported(redis_url: str) -> set[str]:
    """The metric names a running node on Redis declares (``# TYPE`` lines: counters as
    name_total, histograms as name_bucket / _sum / _count), plus what the worker merge adds."""
    async with running(redis_url=redis_url, redis_prefix="metricnames") as node:
        text = (await _get(f"http://127.0.0.1:{node.port}/metrics")).decode()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    peers = (ROOT / "src" / "roomcast" / "http" / "peers.py").read_text()
    for name in MERGED_ONLY:
        assert f'"{name}"' in peers
    return names | MERGED_ONLY


async def test_expressions_name_only_exported_metrics(redis_url: str) -> None:
    """A renamed or removed metric breaks no panel or alert silently."""
    exported = await _exported(redis_url)
    used: dict[str, set[str]] = {"dashboard": set(), "alerts": set()}
    for expr in dashboard_exprs():
        used["dashboard"] |= set(METRIC_NAME.findall(expr))
    used["alerts"] |= set(METRIC_NAME.findall(RULES.read_text()))
    for where, names in used.items():
        missing = sorted(names - exported)
        assert not missing, f"{where} uses metrics no node exports: {missing}"
    # What the issue asks the dashboard to show is there.
    for name in (
        "roomcast_connections",
        "roomcast_rooms",
        "roomcast_published_total",
        "roomcast_delivered_messages_total",
        "roomcast_publish_to_fanout_seconds_bucket",
        "roomcast_dropped_messages_total",
        "roomcast_broker_up",
        "roomcast_broker_state",
        "roomcast_slow_client_disconnects_total",
    ):
        assert name in used["dashboard"], name


def test_dashboard_variables_and_layout() -> None:
    """Per-instance and per-worker selection apply to every series a panel reads; panel ids and
    query ids are unique; no panel leaves the 24-column grid or overlaps another."""
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "worker"} <= names
    selected = re.compile(r'\broomcast_[a-z_]+\{instance=~"\$instance", worker=~"\$worker"[,}]')
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert len(selected.findall(expr)) == len(METRIC_NAME.findall(expr)) > 0, expr
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool accepts every panel's PromQL (as recording rules, Grafana's variables filled)."""
    promtool = require_binary("promtool")
    rules: list[dict[str, Any]] = []
    for index, expr in enumerate(dashboard_exprs()):
        filled = fill_variables(expr, "5m")
        rules.append({"record": f"roomcast:panel_{index}", "expr": filled})
    path = tmp_path / "panels.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_check_and_unit_tests() -> None:
    """promtool check rules, then promtool test rules: each alert fires when it should and
    not before."""
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = re.findall(r"^      - alert: (\w+)$", RULES.read_text(), re.MULTILINE)
    assert f"SUCCESS: {len(alerts)} rules found" in check.stdout
    test = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check_at in case["alert_rule_test"]:
            (fires if check_at["exp_alerts"] else quiet).add(check_at["alertname"])
    assert not set(alerts) - fires, f"alerts never seen firing: {sorted(set(alerts) - fires)}"
    assert not set(alerts) - quiet, f"alerts never seen quiet: {sorted(set(alerts) - quiet)}"
