"""Every metric, on one injected registry."""

from __future__ import annotations

import enum
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Gauge("roomcast_connections", "Open Engine.IO sessions", registry=r)
        self.connections_opened = Counter(
            "roomcast_connections_opened",
            "Engine.IO sessions opened (or handed over from another worker)",
            registry=r,
        )
        self.sockets = Gauge("roomcast_sockets", "Connected Socket.IO sockets", registry=r)
        self.rooms = Gauge("roomcast_rooms", "Rooms with local members", registry=r)
        self.ready = Gauge(
            "roomcast_ready",
            "1 while /readyz answers ready (the value is read at scrape)",
            registry=r,
        )
        self.disconnects = Counter(
            "roomcast_disconnects", "Closed sessions by reason", ["reason"], registry=r
        )
        self.slow_client_disconnects = Counter(
            "roomcast_slow_client_disconnects",
            "Sessions closed because their outbound buffer overflowed",
            registry=r,
        )
        self.connections_refused = Counter(
            "roomcast_connections_refused", "Refused connections by reason", ["reason"], registry=r
        )
        self.engine_request_errors = Counter(
            "roomcast_engine_request_errors", "Refused Engine.IO requests", ["code"], registry=r
        )
        self.protocol_errors = Counter(
            "roomcast_protocol_errors", "Malformed client input by reason", ["reason"], registry=r
        )
        self.http_refused = Counter(
            "roomcast_http_refused",
            "HTTP connections refused or closed before a request was handled, by reason",
            ["reason"],
            registry=r,
        )
        self.refused_events = Counter(
            "roomcast_refused_client_events",
            "Built-in client events (join, leave, publish) refused, by code",
            ["code"],
            registry=r,
        )
        self.rate_limited = Counter(
            "roomcast_rate_limited",
            "Requests refused by a rate limit, by limit (events, joins, rooms, "
            "user_connect_rate, user_connections, api)",
            ["limit"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "roomcast_rate_limit_errors",
            "Broker failures of the per-user connection limits, by operation (admit: a connect "
            "let in unchecked; release, keep: a hold not written, healed by its TTL)",
            ["op"],
            registry=r,
        )
        self.auth_failures = Counter(
            "roomcast_auth_failures", "Refused namespace connects by code", ["code"], registry=r
        )
        self.dropped = Counter(
            "roomcast_dropped_messages", "Messages not delivered, by reason", ["reason"], registry=r
        )
        self.invalid_payloads = Counter(
            "roomcast_invalid_payloads",
            "Payloads refused by their event's schema, by source and event",
            ["source", "event"],
            registry=r,
        )
        self.published = Counter(
            "roomcast_published", "Publications accepted, by source", ["source"], registry=r
        )
        self.delivered = Counter(
            "roomcast_delivered_messages", "Messages written to clients by broadcasts", registry=r
        )
        self.broadcasts = Counter(
            "roomcast_broadcasts", "Publications fanned out to local members", registry=r
        )
        self.client_events = Counter(
            "roomcast_client_events", "Events received from clients", registry=r
        )
        self.recoveries = Counter(
            "roomcast_recoveries", "Connection state recovery attempts", ["result"], registry=r
        )
        self.task_failures = Counter(
            "roomcast_task_failures",
            "Background tasks that ended with an error, by kind",
            ["kind"],
            registry=r,
        )
        self.refreshes = Counter(
            "roomcast_token_refreshes",
            "Token refreshes on live sockets, by result (ok, or the refusal's code)",
            ["result"],
            registry=r,
        )
        self.cluster_requests = Counter(
            "roomcast_cluster_requests",
            "Server API requests to every instance, by operation and result (complete: every "
            "live instance answered in time; incomplete: some did not)",
            ["op", "result"],
            registry=r,
        )
        self.handoffs = Counter(
            "roomcast_handoffs",
            "WebSocket sessions moved to the worker that owns their first room, by result "
            "(sent, received, kept: could not move and joined here, failed: lost in the move)",
            ["result"],
            registry=r,
        )
        self.admin_logins = Counter(
            "roomcast_admin_logins",
            "Admin UI connections, by result (password, session, refused, busy)",
            ["result"],
            registry=r,
        )
        self.admin_actions = Counter(
            "roomcast_admin_actions",
            "Admin UI actions (join, leave, disconnect, emit), by action and result "
            "(done, readonly, invalid, failed)",
            ["action", "result"],
            registry=r,
        )
        self.admin_resyncs = Counter(
            "roomcast_admin_resyncs",
            "Full socket lists sent to the Admin UIs of this instance, by cause",
            ["cause"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "roomcast_publish_to_fanout_seconds",
            "Time from publish to local fan-out",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )


class BrokerCollector:
    """Exports a broker's own counters (``dropped``, ``errors``, ``reconnects``) at scrape time,
    so the broker needs no reference to the metrics object."""

    def __init__(self, broker: object) -> None:
        self._broker = broker

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "roomcast_broker_up",
            "1 if the broker is connected and able to deliver (Redis: notifications verified)",
            value=1 if getattr(self._broker, "ready", False) else 0,
        )
        state = getattr(self._broker, "state", None)
        if isinstance(state, enum.Enum):
            states = GaugeMetricFamily(
                "roomcast_broker_state",
                "1 for the broker's current state (starting, connected, disconnected, stopped), "
                "0 for the others: connected with roomcast_broker_up 0 means notifications are "
                "not verified yet",
                labels=["state"],
            )
            for member in type(state):
                states.add_metric([str(member.value)], 1 if member is state else 0)
            yield states
        dropped = CounterMetricFamily(
            "roomcast_broker_dropped_entries",
            "Stream entries the broker did not deliver, by reason",
            labels=["reason"],
        )
        for reason, count in getattr(self._broker, "dropped", {}).items():
            dropped.add_metric([reason], count)
        yield dropped
        errors = CounterMetricFamily(
            "roomcast_broker_errors", "Broker failures, by kind", labels=["kind"]
        )
        for kind, count in getattr(self._broker, "errors", {}).items():
            errors.add_metric([kind], count)
        yield errors
        reconnects = getattr(self._broker, "reconnects", None)
        if isinstance(reconnects, int):
            yield CounterMetricFamily(
                "roomcast_broker_reconnects", "Broker reconnections", value=reconnects
            )
