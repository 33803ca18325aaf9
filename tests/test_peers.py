"""Merging the workers' views for ``/metrics`` and ``/readyz`` (``roomcast.http.peers``)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from roomcast.broker.base import PublishRequest, PublishResult
from roomcast.http import peers
from roomcast.http.routes import Router
from roomcast.metrics import Metrics
from roomcast.tasks import TaskSet
from roomcast.transport.http import HttpConnection


def _exposition(published: int) -> bytes:
    registry = CollectorRegistry()
    counter = Counter("roomcast_published", "Publications", ["source"], registry=registry)
    counter.labels("http").inc(published)
    Histogram("roomcast_lag_seconds", "Lag", registry=registry, buckets=(0.1,)).observe(0.05)
    return generate_latest(registry)


def _values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each series' value (``_created`` left out); a series given twice, or a family whose
    HELP or TYPE line repeats, fails the test."""
    lines = text.decode().splitlines()
    for kind in ("# HELP ", "# TYPE "):
        names = [line.split()[2] for line in lines if line.startswith(kind)]
        assert len(names) == len(set(names)), f"repeated {kind.strip()} line: {names}"
    series = [
        ((s.name, tuple(sorted(s.labels.items()))), s.value)
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    ]
    values = dict(series)
    assert len(values) == len(series), "a series appears twice"
    return values


def test_every_sample_is_labelled_with_its_worker_and_missing_workers_are_down() -> None:
    merged = _values(
        peers.merge_metrics([("00", _exposition(3)), ("01", _exposition(4)), ("02", None)])
    )
    assert merged[("roomcast_published_total", (("source", "http"), ("worker", "00")))] == 3
    assert merged[("roomcast_published_total", (("source", "http"), ("worker", "01")))] == 4
    assert merged[("roomcast_lag_seconds_bucket", (("le", "0.1"), ("worker", "01")))] == 1
    assert merged[("roomcast_lag_seconds_count", (("worker", "00"),))] == 1
    up = {labels: value for (name, labels), value in merged.items() if name == "roomcast_worker_up"}
    assert up == {(("worker", "00"),): 1, (("worker", "01"),): 1, (("worker", "02"),): 0}
    assert not any(
        dict(labels).get("worker") == "02" for (name, labels) in merged if "published" in name
    )


def test_a_worker_whose_metrics_do_not_parse_counts_as_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "roomcast.workers"):
        merged = _values(
            peers.merge_metrics([("00", _exposition(1)), ("01", b"roomcast_x{ 1 2 3\n")])
        )
    assert merged[("roomcast_worker_up", (("worker", "01"),))] == 0
    assert merged[("roomcast_worker_up", (("worker", "00"),))] == 1
    assert "worker 01 sent metrics that do not parse" in caplog.text


def test_the_instance_is_ready_only_when_every_worker_is() -> None:
    up = orjson.dumps({"ready": True, "broker": "connected"})
    down = orjson.dumps({"ready": False, "broker": "disconnected"})
    assert peers.merge_readiness([("00", 200, up, ""), ("01", 200, up, "")])[0] is True
    ready, detail = peers.merge_readiness([("00", 200, up, ""), ("01", 503, down, "")])
    assert ready is False
    assert detail["workers"] == {
        "00": {"ready": True, "broker": "connected"},
        "01": {"ready": False, "broker": "disconnected"},
    }
    said_not_ready = orjson.dumps({"ready": False})  # whatever the status says
    assert peers.merge_readiness([("00", 200, up, ""), ("01", 200, said_not_ready, "")])[0] is False
    assert peers.merge_readiness([("00", 200, up, ""), ("01", 200, b"<html>", "")])[0] is False
    ready, detail = peers.merge_readiness([("00", 200, up, ""), ("01", 0, None, "no answer")])
    assert ready is False
    assert detail["workers"]["01"] == {"ready": False, "error": "no answer"}  # type: ignore[index]


async def _serving(path: Path, reply: bytes | None, *, split: int = 0) -> asyncio.Server:
    """A unix server that reads one request and sends ``reply`` (``None``: never answers),
    with ``split``: its first ``split`` bytes, a pause, then the rest."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply is None:
            await reader.read()  # until the asker gives up and closes
        else:
            for part in (reply[:split], reply[split:]) if split else (reply,):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.02)
        writer.close()

    return await asyncio.start_unix_server(answer, str(path))


async def test_a_peer_is_asked_over_its_unix_socket(tmp_path: Path) -> None:
    body = b"roomcast_x 1.0\n"
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(body),
        body,
    )
    server = await _serving(tmp_path / "w1.sock", reply)
    async with server:
        answers = await peers.gather(
            ("00", 503, b"own"), {"01": str(tmp_path / "w1.sock")}, "/metrics?scope=worker"
        )
    assert answers == [("00", 503, b"own", ""), ("01", 200, body, "")]


def _http(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize("size", [15, 300_000])
async def test_an_answer_that_arrives_in_pieces_is_read_whole(tmp_path: Path, size: int) -> None:
    body = b"x" * size
    reply = _http(200, body)
    server = await _serving(tmp_path / "w1.sock", reply, split=len(reply) - size // 2 - 1)
    async with server:
        status, got = await peers.ask_worker(str(tmp_path / "w1.sock"), "/metrics")
    assert (status, got) == (200, body)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (None, "no answer within 0.5 s"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "body of 5 bytes, announced"),
        (b"garbage", "not an http response"),
    ],
)
async def test_a_peer_that_does_not_answer_properly_is_reported_with_why(
    tmp_path: Path, reply: bytes | None, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await _serving(tmp_path / "w1.sock", reply)
    async with server:
        with caplog.at_level(logging.WARNING, "roomcast.workers"):
            answers = await peers.gather(
                ("00", 200, b"own"), {"01": str(tmp_path / "w1.sock")}, "/readyz?scope=worker"
            )
    name, status, body, why = answers[1]
    assert (name, status, body) == ("01", 0, None)
    assert reason in why
    assert f"worker 01 did not answer /readyz?scope=worker: {why}" in caplog.text


async def test_a_worker_that_is_not_listening_is_down(tmp_path: Path) -> None:
    answers = await peers.gather(("00", 200, b"own"), {"01": str(tmp_path / "gone.sock")}, "/x")
    assert answers[1][:3] == ("01", 0, None)
    assert answers[1][3].startswith("cannot connect")


async def _router_get(router: Router, target: str) -> tuple[int, bytes]:
    """``GET target`` from ``router`` served by Roomcast's own HTTP server on loopback."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpConnection(router), "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _router(tmp_path: Path, ready: bool = True, peer: str = "gone.sock") -> Router:
    async def publish(request: PublishRequest) -> PublishResult:
        raise AssertionError("not used")

    metrics = Metrics()
    metrics.published.labels("http").inc(2)
    return Router(
        metrics=metrics,
        tasks=TaskSet(),
        publish=publish,
        api_key="k",
        readiness=lambda: (ready, {"broker": "connected" if ready else "disconnected"}),
        max_payload=1024,
        worker="00",
        peer_sockets={"01": str(tmp_path / peer)},
    )


async def test_a_scrape_with_a_worker_down_reports_the_rest_and_who_is_down(
    tmp_path: Path,
) -> None:
    status, body = await _router_get(_router(tmp_path), "/metrics")
    assert status == 200
    merged = _values(body)
    assert merged[("roomcast_published_total", (("source", "http"), ("worker", "00")))] == 2
    assert merged[("roomcast_worker_up", (("worker", "00"),))] == 1
    assert merged[("roomcast_worker_up", (("worker", "01"),))] == 0
    status, body = await _router_get(_router(tmp_path), "/metrics?scope=worker")
    assert status == 200
    assert ("roomcast_published_total", (("source", "http"),)) in _values(body)


async def test_the_probe_fails_while_any_worker_is_not_ready(tmp_path: Path) -> None:
    status, body = await _router_get(_router(tmp_path), "/readyz")
    assert status == 503
    detail = orjson.loads(body)
    assert detail["ready"] is False
    assert detail["workers"]["00"] == {"ready": True, "broker": "connected"}
    assert detail["workers"]["01"]["error"].startswith("cannot connect")
    status, body = await _router_get(_router(tmp_path, ready=False), "/readyz?scope=worker")
    assert (status, orjson.loads(body)["broker"]) == (503, "disconnected")


@pytest.mark.parametrize(
    ("path", "merge", "what"),
    [("/metrics", "merge_metrics", "metrics"), ("/readyz", "merge_readiness", "readiness")],
)
async def test_a_merge_that_fails_still_answers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    merge: str,
    what: str,
) -> None:
    def broken(views: object) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(peers, merge, broken)
    with caplog.at_level(logging.ERROR, "roomcast.api"):
        status, body = await _router_get(_router(tmp_path), path)
    assert status == 500
    assert orjson.loads(body)["error"]["code"] == "internal_error"
    assert f"merging the workers' {what} failed" in caplog.text


async def test_a_worker_that_answers_metrics_with_an_error_is_down_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await _serving(tmp_path / "w1.sock", _http(500, b"broken"))
    async with server:
        with caplog.at_level(logging.WARNING, "roomcast.api"):
            status, body = await _router_get(_router(tmp_path, peer="w1.sock"), "/metrics")
    assert status == 200
    assert _values(body)[("roomcast_worker_up", (("worker", "01"),))] == 0
    assert "worker 01 answered /metrics?scope=worker with 500; counted as down" in caplog.text
