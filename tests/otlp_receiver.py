"""An OTLP/HTTP trace receiver the test runs itself: what an OpenTelemetry collector would see.

``POST /v1/traces`` bodies (``application/x-protobuf``, gzip or not) are decoded with
``opentelemetry-proto`` into :class:`ReceivedSpan` values; tests wait for the spans they expect
with :meth:`OtlpReceiver.wait`.  Test modules import what they use
(``from otlp_receiver import ...``), the ``otlp_receiver`` fixture included: it points the
``OTEL_*`` variables of the processes the test starts at the receiver.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as exported, ids in lower-case hex (``parent`` is ``""`` for a root span)."""

    service: str
    name: str
    kind: str
    """``SPAN_KIND_PRODUCER``, ``SPAN_KIND_CONSUMER``, ``SPAN_KIND_INTERNAL``, ..."""
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


class OtlpReceiver:
    """A ``ThreadingHTTPServer`` on ``127.0.0.1`` that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._received(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the exporters' requests are not news

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (exporters add ``/v1/traces``)."""
        return f"http://127.0.0.1:{self.port}"

    def _received(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            kind=Span.SpanKind.Name(span.kind),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._changed:
            self.requests += 1
            self.spans.extend(spans)
            self._changed.notify_all()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._changed:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait(
        self,
        predicate: Callable[[list[ReceivedSpan]], bool],
        *,
        trace_id: str,
        what: str,
        timeout: float = 15.0,
    ) -> list[ReceivedSpan]:
        """The spans of ``trace_id`` once ``predicate`` holds for them; fail at the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                spans = [span for span in self.spans if span.trace_id == trace_id]
                if predicate(spans):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    shown = "\n".join(f"  {s.name} {s.span_id} <- {s.parent}" for s in spans)
                    pytest.fail(f"no {what} within {timeout}s; trace {trace_id} has:\n{shown}")
                self._changed.wait(remaining)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def otlp_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A receiver, with the ``OTEL_*`` variables of processes started by the test pointing at
    it (exports every 50 ms, so spans arrive while the test waits)."""
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "roomcast-test")
    yield receiver
    receiver.close()
