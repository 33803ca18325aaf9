"""The Grafana dashboard and the alerting rules against a real Prometheus (Debian's package)
that scrapes real instances on Redis, one of them with ``--workers 2``: every panel's query and
every rule evaluates without error, the panels the operator needs show numbers, the template
variables list every instance and worker, no alert fires on a healthy deployment, and
``RoomcastInstanceDown`` goes pending for an instance that stops answering."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import multi_fixtures
import pytest
from conftest import http_json
from multi_fixtures import ClientsError, NodeClients, publish_ok, redis_args
from test_alert_rules import DASHBOARD, METRIC_NAME, RULES, dashboard_exprs, fill_variables

import redis_fixtures
from redis_fixtures import free_port, require_binary

if TYPE_CHECKING:
    from conftest import Mint

gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients
redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix

T = TypeVar("T")
SCRAPE = "1s"
RATE_WINDOW = "30s"
"""What ``$__rate_interval`` stands for here (Grafana: at least four scrape intervals)."""
MUST_SHOW = (
    "roomcast_connections",
    "roomcast_sockets",
    "roomcast_rooms",
    "roomcast_published_total",
    "roomcast_delivered_messages_total",
    "roomcast_broadcasts_total",
    "roomcast_publish_to_fanout_seconds_bucket",
    "roomcast_broker_up",
    "roomcast_broker_state",
    "roomcast_ready",
    "roomcast_worker_up",
)
"""A panel query over one of these must give at least one finite number after the traffic."""


class Prometheus:
    """One ``prometheus`` process on a free port, scraping ``targets`` every second and
    evaluating ``rules`` every second; its data in ``workdir``."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path) -> None:
        binary = require_binary("prometheus")
        self.port = free_port()
        config = {
            "global": {
                "scrape_interval": SCRAPE,
                "scrape_timeout": "900ms",
                "evaluation_interval": SCRAPE,
            },
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "roomcast", "static_configs": [{"targets": targets}]}],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.workdir = workdir
        _until(lambda: self._ready(), timeout=30, what="prometheus /-/ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``: the answer's ``data``; fails the test on an error answer."""
        query = urllib.parse.urlencode(params)
        status, body = http_json("GET", f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}")
        assert status == 200 and body["status"] == "success", (path, params, status, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _until(probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus-{len(started)}", targets, RULES)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def _scraped_sum(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    return sum(float(sample["value"][1]) for sample in result)


@pytest.mark.interop
def test_dashboard_and_alerts_on_a_real_prometheus(
    gateways: multi_fixtures.GatewayFactory,
    node_clients: NodeClients,
    prometheus: Callable[[list[str]], Prometheus],
    redis_url: str,
    mint: Mint,
    redis_prefix: str,
) -> None:
    """Two instances (one with two workers) scraped by Prometheus: the dashboard's queries
    show the traffic per instance and per worker, the rules evaluate cleanly and stay quiet,
    and an instance that dies is noticed."""
    (pair,) = gateways(1, *redis_args(redis_url, redis_prefix, "--workers", "2"))
    (single,) = gateways(1, *redis_args(redis_url, redis_prefix))
    targets = {f"127.0.0.1:{server.port}": server for server in (pair, single)}
    prom = prometheus(list(targets))
    _until(
        lambda: _scraped_sum(prom, 'up{job="roomcast"}') == 2,
        timeout=30,
        what="both instances scraped",
    )

    # Traffic in two rounds, so that every counter exists before the second round and the
    # rates over the window are above zero.
    token = mint("dash-user", rooms=("dash:*",))
    clients = {"p1": pair, "p2": pair, "s1": single}
    for name, server in clients.items():
        node_clients.connect(name, server.url, token)
        node_clients.join(name, "dash:1")
    with pytest.raises(ClientsError, match="token_invalid"):
        node_clients.connect("forged", single.url, token[:-4] + "AAAA")
    rounds = 0
    for count in (1, 3):
        for _ in range(count):
            for server in (pair, single):
                publish_ok(server, "dash:1", "tick", {"n": rounds})
                rounds += 1
        for name in clients:
            node_clients.wait_events(name, rounds)
        published = f'sum(roomcast_published_total{{job="roomcast"}}) >= {rounds}'
        _until(
            lambda: prom.query(published),  # noqa: B023 - called before the loop moves on
            timeout=30,
            what=f"prometheus to scrape {rounds} publications",
        )
    _until(
        lambda: _finite(
            prom.query(
                "histogram_quantile(0.95, sum by (le) "
                f"(rate(roomcast_publish_to_fanout_seconds_bucket[{RATE_WINDOW}])))"
            )
        ),
        timeout=30,
        what="a publish-to-fan-out p95",
    )

    # Every panel's query evaluates (type errors and many-to-many matches only show here),
    # and the panels over the traffic's metrics show numbers.
    empty: list[str] = []
    for expr in dashboard_exprs():
        result = prom.query(fill_variables(expr, RATE_WINDOW))
        if set(METRIC_NAME.findall(expr)) & set(MUST_SHOW) and not _finite(result):
            empty.append(expr)
    assert not empty, f"panels without data: {empty}"
    per_instance = prom.query(
        fill_variables(
            'sum by (instance) (rate(roomcast_delivered_messages_total{instance=~"$instance", '
            'worker=~"$worker"}[$__rate_interval]))',
            RATE_WINDOW,
        )
    )
    assert {s["metric"]["instance"] for s in per_instance} == set(targets)

    # The template variables list what Grafana would offer.
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v["query"]["query"] for v in dashboard["templating"]["list"][1:]}
    assert set(variables) == {"instance", "worker"}
    for name, definition in variables.items():
        assert definition.startswith("label_values(") and definition.endswith(f", {name})")
        selector = definition[len("label_values(") : -len(f", {name})")]
        values = prom.api(f"label/{name}/values", **{"match[]": fill_variables(selector, "")})
        expected = set(targets) if name == "instance" else {"00", "01"}
        assert set(values) == expected, (name, values)

    # Every rule has been evaluated, without error; a healthy deployment raises nothing.
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prom.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = all(not rule["lastEvaluation"].startswith("0001-") for rule in rules)
        return rules if rules and done else None

    rules = _until(evaluated, timeout=30, what="every rule evaluated")
    assert len(rules) == RULES.read_text().count("- alert: ")
    assert all(rule["health"] == "ok" for rule in rules), [
        (rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
    ]
    assert prom.api("alerts")["alerts"] == []

    # An instance that stops answering: RoomcastInstanceDown goes pending for it alone.
    single.kill()
    dead = f"127.0.0.1:{single.port}"

    def pending() -> list[dict[str, Any]] | None:
        alerts = [a for a in prom.api("alerts")["alerts"] if a["state"] == "pending"]
        return alerts or None

    alerts = _until(pending, timeout=30, what="RoomcastInstanceDown pending")
    assert [(a["labels"]["alertname"], a["labels"]["instance"]) for a in alerts] == [
        ("RoomcastInstanceDown", dead)
    ]
