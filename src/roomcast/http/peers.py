"""With ``--workers N``, any worker answers ``/metrics`` and ``/readyz`` for the whole instance.

The kernel gives each scrape or probe to any worker (``SO_REUSEPORT``), so a worker answering
alone would report only its own share: counters would jump between workers' values from one
scrape to the next, and a worker whose broker is down would fail one probe in N.  The worker
that gets the request asks every other worker for its own view over that worker's peer unix
socket (:func:`peer_path`; it serves only ``/metrics``, ``/readyz`` and ``/healthz``, without
a key, see ``roomcast.http.access``), with ``?scope=worker`` so the question is not passed on
again, and merges the answers:

- metrics: every sample gets a ``worker`` label (``"00"``, ``"01"``, ...), and
  ``roomcast_worker_up{worker=...}`` says which workers answered this scrape;
- readiness: ready only when every worker is ready.

A worker that does not answer within ``PEER_TIMEOUT`` (restarting, stuck) counts as down for
that request; its reason is logged and the request still gets an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Final

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("roomcast.workers")

WORKER_SCOPE: Final = "worker"
"""``?scope=worker``: answer with this worker's own view only."""

PEER_TIMEOUT: Final = 0.5
"""Seconds a worker waits for another's view; a Kubernetes probe times out after 1 s by default."""

_MAX_RESPONSE: Final = 16 * 1024 * 1024


def peer_path(worker_socket: str) -> str:
    """The peer unix socket of the worker whose piping socket is ``worker_socket``.

    Apart from the piping socket because that one carries client connections piped from
    other workers, which must meet the public listener's rules."""
    return worker_socket + ".peer"


class PeerError(Exception):
    """A worker's answer could not be read; the message says why."""


async def ask_worker(unix_path: str, target: str) -> tuple[int, bytes]:
    """``GET target`` from the worker listening on ``unix_path``: its status and body.

    Raise :class:`PeerError` when the worker cannot be reached, does not answer within
    ``PEER_TIMEOUT``, or answers something that is not a whole HTTP response."""
    try:
        async with asyncio.timeout(PEER_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(unix_path)
            try:
                writer.write(
                    f"GET {target} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode()
                )
                raw = bytearray()
                while chunk := await reader.read(65536):  # the worker closes after answering
                    raw += chunk
                    if len(raw) > _MAX_RESPONSE:
                        raise PeerError(f"answer longer than {_MAX_RESPONSE} bytes")
            finally:
                writer.close()
    except TimeoutError:
        raise PeerError(f"no answer within {PEER_TIMEOUT} s") from None
    except OSError as exc:
        raise PeerError(f"cannot connect: {exc}") from None
    head, separator, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if not separator or len(parts) < 2 or not parts[1].isdigit():
        raise PeerError(f"not an http response: {raw[:80]!r}")
    for line in header_lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip() != str(len(body)).encode():
            raise PeerError(f"body of {len(body)} bytes, announced {value.strip()!r}")
    return int(parts[1]), bytes(body)


Answer = tuple[str, int, bytes | None, str]
"""A worker's answer: its name, status, body (``None``: no answer) and why it has none."""


async def gather(own: tuple[str, int, bytes], peers: dict[str, str], target: str) -> list[Answer]:
    """This worker's answer ``own`` (name, status, body) and every peer's (name -> unix
    socket) to ``target``, in worker order."""

    async def one(name: str, path: str) -> Answer:
        try:
            status, body = await ask_worker(path, target)
        except PeerError as exc:
            log.warning("worker %s did not answer %s: %s", name, target, exc)
            return name, 0, None, str(exc)
        return name, status, body, ""

    answers = await asyncio.gather(*(one(name, path) for name, path in peers.items()))
    name, status, body = own
    return sorted([(name, status, body, ""), *answers])


def merge_metrics(views: Iterable[tuple[str, bytes | None]]) -> bytes:
    """One exposition from each worker's (``None``: no answer), every sample labelled with
    its worker, plus ``roomcast_worker_up``."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "roomcast_worker_up", "1 if the worker answered this scrape, else 0", labels=["worker"]
    )
    for worker, text in views:
        samples: list[tuple[Metric, Sample]] = []
        if text is not None:
            try:
                for family in text_string_to_metric_families(text.decode("utf-8")):
                    merged = families.get(family.name)
                    if merged is None:
                        merged = Metric(family.name, family.documentation, family.type, family.unit)
                        families[family.name] = merged
                    for sample in family.samples:
                        labelled = sample._replace(labels={**sample.labels, "worker": worker})
                        samples.append((merged, labelled))
            except Exception as exc:  # noqa: BLE001 - logged; the worker counts as down
                # (the parser raises ValueError, or IndexError in older prometheus-client)
                log.warning("worker %s sent metrics that do not parse: %r", worker, exc)
                text, samples = None, []
        for merged, sample in samples:
            merged.samples.append(sample)
        up.add_metric([worker], 0 if text is None else 1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), up]))
    return generate_latest(registry)


def merge_readiness(answers: Iterable[Answer]) -> tuple[bool, dict[str, object]]:
    """Ready when every worker answered 200 with ``"ready": true``; each worker's own answer
    (or why it has none)."""
    ready = True
    workers: dict[str, object] = {}
    for worker, status, body, reason in answers:
        detail: object = {"ready": False, "error": reason}
        if body is not None:
            try:
                detail = orjson.loads(body)
            except orjson.JSONDecodeError:
                detail = {"ready": False, "error": f"not json: {body[:80]!r}"}
        said_ready = isinstance(detail, dict) and detail.get("ready") is True
        ready = ready and status == 200 and said_ready
        workers[worker] = detail
    return ready, {"workers": workers}


class _Families:
    """A collector that yields fixed metric families (the merged views)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
