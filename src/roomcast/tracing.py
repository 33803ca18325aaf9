"""OpenTelemetry traces: an optional extra (``pip install 'roomcast[otel]'``), off unless asked for.

This is the only module that imports ``opentelemetry``, and it does so only once tracing is
switched on, so Roomcast without the extra, or with tracing off, never loads it.

Switched on by the ``tracing`` setting: ``on``, ``off``, or ``auto`` (the default), which is on
when the standard variables ask for OTLP traces (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and off with
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``.  Spans are exported by the OTLP/HTTP
exporter, which reads the other ``OTEL_EXPORTER_OTLP_*`` variables itself; the sampler, the
batch processor and the resource read theirs (``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``).

The spans (``docs/operations.md``, "Traces"):

- ``roomcast publish`` (producer): a publication made through the gateway's publish path (HTTP
  API, ``roomcast publish``) or a :class:`~roomcast.publisher.Publisher`. Its parent is the W3C
  ``traceparent`` given with the publication, else the caller's current span; the envelope then
  carries this span's ``traceparent``.
- ``roomcast receive`` (consumer): on every instance that delivers a publication carrying a
  ``traceparent``, a child of it, from the publication's time to the broker handing it over:
  the broker hop.
- ``roomcast fanout``: its child, the send to the room's members on that instance.
- ``roomcast upstream`` (producer): a client event appended to the upstream stream; the entry
  carries its ``traceparent``.

With tracing off none of this runs per publication: the node registers the plain delivery
handler, and the publish paths test one attribute for ``None``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

from roomcast.broker.base import DeliveryHandler, Publication, PublishRequest, PublishResult
from roomcast.config import TRACING_MODES, ConfigError, redact_url

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Status
    from opentelemetry.trace import TracerProvider as ApiTracerProvider

__all__ = ["Tracing", "active", "check", "enable", "setup", "shutdown", "wanted"]

log = logging.getLogger("roomcast.tracing")

_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOLS: Final = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_SYSTEM: Final = "roomcast"
_EXPORTER: Final = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

active: Tracing | None = None
"""The process's tracing once switched on (by :func:`setup` or :func:`enable`), else None."""

_installed: TracerProvider | None = None
"""The SDK provider :func:`setup` installed (flushed and shut down by :func:`shutdown`)."""


def wanted(mode: str, environ: Mapping[str, str]) -> bool:
    """Whether tracing is on for the ``tracing`` setting ``mode`` and the ``OTEL_*`` variables.

    Raise :class:`~roomcast.config.ConfigError` for a mode, an exporter or a protocol
    Roomcast does not have."""
    if mode not in TRACING_MODES:
        raise ConfigError(f"tracing must be one of {', '.join(TRACING_MODES)}, got {mode!r}")
    if mode == "off" or _flag(environ, "OTEL_SDK_DISABLED") == "true":
        return False
    exporter = _flag(environ, "OTEL_TRACES_EXPORTER")
    if exporter not in ("", "otlp", "none"):
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: roomcast exports traces with otlp only, got {exporter!r}"
        )
    for name in _PROTOCOLS:
        protocol = _flag(environ, name)
        if protocol not in ("", "http/protobuf"):
            raise ConfigError(
                f"{name}: roomcast's otlp exporter speaks http/protobuf, got {protocol!r}"
            )
    if mode == "on":
        return True
    if exporter == "none":
        return False
    return exporter == "otlp" or any(environ.get(name, "").strip() for name in _ENDPOINTS)


def check(mode: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is :func:`wanted` and can be on.  Without the ``otel`` extra, ``on``
    raises :class:`~roomcast.config.ConfigError`, and ``auto`` (the ``OTEL_*`` variables of a
    platform) logs a warning and stays off."""
    environ = os.environ if environ is None else environ
    if not wanted(mode, environ):
        return False
    for module in ("opentelemetry.sdk.trace", _EXPORTER):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            if mode == "auto":  # OTEL_* set by the platform for everyone: not a reason to die
                log.warning(
                    "OTEL_* variables ask for tracing but OpenTelemetry is not installed "
                    "(%s): tracing stays off; pip install 'roomcast[otel]', or "
                    "--tracing off to silence this",
                    module,
                )
                return False
            raise _missing(mode, module)
    return True


def _missing(mode: str, module: str | None) -> ConfigError:
    return ConfigError(
        f"tracing is on (tracing={mode!r} or OTEL_* variables) but OpenTelemetry is not "
        f"installed ({module}): pip install 'roomcast[otel]'"
    )


def setup(mode: str) -> Tracing | None:
    """Switch tracing on if :func:`wanted` (by ``mode`` and this process's environment), once
    per process; return it, or None when off.

    Installs an SDK tracer provider exporting with OTLP/HTTP as the global provider, unless
    the process already has one (an ``--app`` that set OpenTelemetry up itself): Roomcast's
    spans then go to that one. Raise :class:`ConfigError` when tracing is wanted but the
    ``otel`` extra is not installed."""
    global _installed
    if active is not None:
        return active
    environ = os.environ
    if not check(mode, environ):  # off, or auto without the extra (warned)
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise _missing(mode, exc.name) from None
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        log.info("tracing on, with the tracer provider the process set up")
        return enable(current)
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "roomcast"}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if _flag(environ, "OTEL_TRACES_EXPORTER") != "none":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info(
            "tracing on: spans of service %r exported with OTLP/HTTP to %s",
            resource.attributes.get(SERVICE_NAME),
            redact_url(_endpoint(environ)),
        )
    else:
        log.info("tracing on, exporting nothing (OTEL_TRACES_EXPORTER=none)")
    trace.set_tracer_provider(provider)
    _installed = provider
    return enable(provider)


def enable(provider: ApiTracerProvider | None = None) -> Tracing:
    """Make Roomcast's spans with ``provider`` (default: the global one) in this process.

    For a service that publishes with :class:`~roomcast.publisher.Publisher` and has set
    OpenTelemetry up itself: after ``enable()`` its publishes are spans of its traces."""
    global active
    if provider is None:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
    active = Tracing(provider)
    return active


def shutdown() -> None:
    """Export the spans still queued and stop the provider :func:`setup` installed (at exit)."""
    global active, _installed
    provider, _installed, active = _installed, None, None
    if provider is not None:
        provider.shutdown()


def _flag(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip().lower()


def _endpoint(environ: Mapping[str, str]) -> str:
    """Where the OTLP/HTTP exporter sends traces (its own rules, for the log)."""
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


class Tracing:
    """Makes Roomcast's spans with one tracer."""

    __slots__ = (
        "_consumer",
        "_extract",
        "_in_span",
        "_inject",
        "_producer",
        "_root",
        "_tracer",
        "failures",
    )

    def __init__(self, provider: ApiTracerProvider) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        propagator = TraceContextTextMapPropagator()
        self._tracer = provider.get_tracer("roomcast")
        self._extract = propagator.extract
        self._inject = propagator.inject
        self._in_span = set_span_in_context
        self._producer = SpanKind.PRODUCER
        self._consumer = SpanKind.CONSUMER
        self._root: Context = Context()
        self.failures = 0
        """Span operations that raised (a failing processor or exporter hook): counted and
        logged, never passed on to what was being traced."""

    def _failed(self, what: str) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.exception("tracing: %s failed (%d so far); going on untraced", what, self.failures)

    # -- the W3C traceparent ----------------------------------------------------------------------
    def _parent(self, traceparent: str | None) -> Context | None:
        """The context ``traceparent`` names; None (the current context) without one."""
        return None if traceparent is None else self._extract({"traceparent": traceparent})

    def traceparent(self, span: Span) -> str | None:
        """``span``'s W3C traceparent; None for an invalid span (no SDK, no parent)."""
        carrier: dict[str, str] = {}
        self._inject(carrier, context=self._in_span(span))
        return carrier.get("traceparent")

    # -- publish ----------------------------------------------------------------------------------
    async def publish(
        self,
        publish: Callable[[PublishRequest], Awaitable[PublishResult]],
        request: PublishRequest,
        *,
        source: str,
        instance: str,
    ) -> PublishResult:
        """``publish(request)`` in a ``roomcast publish`` span, the request's ``traceparent``
        (or the current span) its parent, and this span's ``traceparent`` in the envelope."""
        attributes = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": request.topic,
            "roomcast.room": request.room,
            "roomcast.namespace": request.namespace,
            "roomcast.event": request.event,
            "roomcast.source": source,
            "roomcast.instance": instance,
        }
        try:
            span = self._tracer.start_span(
                "roomcast publish",
                context=self._parent(request.traceparent),
                kind=self._producer,
                attributes=attributes,
            )
            traceparent = self.traceparent(span) or request.traceparent
        except Exception:  # noqa: BLE001 - the SDK's hooks may raise anything; counted, logged
            self._failed("the publish span")
            return await publish(request)
        try:
            result = await publish(dataclasses.replace(request, traceparent=traceparent))
        except BaseException as exc:
            self._close(span, exc)
            raise
        try:
            span.set_attribute("messaging.message.id", result.id)
            span.set_attribute("roomcast.offset", result.offset)
            if result.duplicate:
                span.set_attribute("roomcast.duplicate", True)
        except Exception:  # noqa: BLE001 - stored: its span may be lost, never the answer
            self._failed("the publish span")
        self._close(span, None)
        return result

    def _close(self, span: Span, error: BaseException | None) -> None:
        """End ``span`` (recording ``error``), whatever the SDK's hooks do."""
        try:
            if error is not None and isinstance(error, Exception):
                span.record_exception(error)
                span.set_status(self._error_status(error))
            span.end()
        except Exception:  # noqa: BLE001 - the SDK's hooks may raise anything; counted, logged
            self._failed("ending a span")

    @staticmethod
    def _error_status(error: Exception) -> Status:
        from opentelemetry.trace import Status, StatusCode

        return Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")

    # -- delivery ---------------------------------------------------------------------------------
    def delivery(self, fanout: Callable[[Publication], int], instance: str) -> DeliveryHandler:
        """A delivery handler that calls ``fanout`` (which returns the number of members it
        sent to) in ``roomcast receive`` / ``roomcast fanout`` spans, for publications that
        carry a ``traceparent``; the others are delivered as without tracing."""
        tracer, extract, in_span, consumer = (
            self._tracer,
            self._extract,
            self._in_span,
            self._consumer,
        )

        def deliver(publication: Publication) -> None:
            traceparent = publication.traceparent
            if traceparent is None:
                fanout(publication)
                return
            try:
                fanout_span = receive_and_fanout(publication)
            except Exception:  # noqa: BLE001 - the SDK failed: delivered untraced, counted
                self._failed("the receive span")
                fanout(publication)
                return
            if fanout_span is None:  # not sampled
                fanout(publication)
                return
            members = fanout(publication)
            try:
                fanout_span.set_attribute("roomcast.members", members)
                fanout_span.end()
            except Exception:  # noqa: BLE001 - delivered already; the span is lost, counted
                self._failed("the fan-out span")

        def receive_and_fanout(publication: Publication) -> Span | None:
            """The receive span (ended), and its child fan-out span (started), or None when
            the receive span is not sampled."""
            traceparent = publication.traceparent
            now = time.time_ns()
            published = publication.published_at_ms * 1_000_000
            # Few attributes: validating them is most of a span's cost in the SDK.
            receive = tracer.start_span(
                "roomcast receive",
                context=extract({"traceparent": traceparent}),
                kind=consumer,
                start_time=min(published, now) if published else now,
                attributes={
                    "messaging.system": _SYSTEM,
                    "messaging.operation.type": "receive",
                    "messaging.destination.name": publication.topic,
                    "messaging.message.id": publication.id,
                    "roomcast.offset": publication.offset,
                    "roomcast.instance": instance,
                },
            )
            sampled = receive.is_recording()  # (until it ends)
            receive.end(end_time=now)
            if not sampled:  # a fan-out span would be the child of a span nobody sees
                return None
            return tracer.start_span(
                "roomcast fanout",
                context=in_span(receive),
                attributes={
                    "roomcast.room": publication.room,
                    "roomcast.namespace": publication.namespace,
                    "roomcast.instance": instance,
                },
            )

        return deliver

    # -- upstream ---------------------------------------------------------------------------------
    async def upstream(
        self,
        append: Callable[[dict[str, str | bytes]], Awaitable[str]],
        fields: dict[str, str | bytes],
        *,
        socket: str,
        user: str,
        instance: str,
    ) -> str:
        """``append(fields)`` in a ``roomcast upstream`` span, a new trace (a client event has
        no parent), with the span's ``traceparent`` added to ``fields``; return the entry id."""
        attributes = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send",
            "roomcast.event": fields.get("event", ""),
            "roomcast.namespace": fields.get("namespace", "/"),
            "roomcast.socket": socket,
            "roomcast.user": user,
            "roomcast.instance": instance,
        }
        try:
            span = self._tracer.start_span(
                "roomcast upstream", context=self._root, kind=self._producer, attributes=attributes
            )
            traceparent = self.traceparent(span)
        except Exception:  # noqa: BLE001 - the SDK's hooks may raise anything; counted, logged
            self._failed("the upstream span")
            return await append(fields)
        if traceparent is not None:
            fields["traceparent"] = traceparent
        try:
            entry_id = await append(fields)
        except BaseException as exc:
            self._close(span, exc)
            raise
        try:
            span.set_attribute("messaging.message.id", entry_id)
        except Exception:  # noqa: BLE001 - appended: its span may be lost, never the ack
            self._failed("the upstream span")
        self._close(span, None)
        return entry_id
