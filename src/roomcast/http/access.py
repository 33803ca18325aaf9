"""Which listener serves which route, and which key ``/metrics`` asks for.

A node listens on up to three kinds of socket:

- ``PUBLIC``: the main port, which clients reach (and, with workers, the unix socket that
  other workers pipe client connections to: the same traffic, so the same rules);
- ``OPS``: ``--ops-listen``, a second address for operators: ``/metrics``, the probes and
  the server APIs (``/api/...``);
- ``PEER``: with workers, each worker's second unix socket, on which the other workers ask
  for its own ``/metrics`` and ``/readyz`` (inside a private directory, so no key).

When an ops listener is configured, the main port no longer serves ``/metrics`` nor
``/api/...``. ``/metrics`` asks for ``--metrics-key`` when one is set; without one, in
production, it asks for the API key on the main port (an ops listener is protected by where
it is bound instead). See ``docs/operations.md``, "Operational endpoints".
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass

__all__ = ["Access", "Listener", "Route"]


class Listener(enum.Enum):
    PUBLIC = "public"
    OPS = "ops"
    PEER = "peer"


class Route(enum.Enum):
    ENGINE = "engine"
    """Engine.IO / Socket.IO endpoints."""
    METRICS = "metrics"
    API = "api"
    """The server APIs under ``/api/``."""


@dataclass(frozen=True, slots=True)
class Access:
    separate_ops: bool = False
    """An ops listener exists: ``/metrics`` and ``/api/`` are served there, not publicly."""
    metrics_key: bytes = b""
    """The bearer key ``/metrics`` asks for on the public and ops listeners (empty: none)."""

    @classmethod
    def of(cls, *, ops_listen: str, metrics_key: str, production: bool, api_key: str) -> Access:
        separate = bool(ops_listen)
        key = metrics_key or (api_key if production and not separate else "")
        return cls(separate_ops=separate, metrics_key=key.encode())

    def serves(self, listener: Listener, route: Route) -> bool:
        """Whether ``listener`` serves ``route`` (``/healthz`` and ``/readyz``: every one)."""
        if route is Route.ENGINE:
            return listener is Listener.PUBLIC
        if route is Route.METRICS and listener is Listener.PEER:
            return True
        if listener is Listener.PUBLIC:
            return not self.separate_ops
        return listener is Listener.OPS

    def metrics_key_refusal(self, listener: Listener, authorization: str) -> str | None:
        """Why a ``/metrics`` request with this ``Authorization`` header is refused, or None."""
        if listener is Listener.PEER or not self.metrics_key:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "missing Authorization: Bearer <metrics key>"
        if not hmac.compare_digest(key.strip().encode(), self.metrics_key):
            return "invalid metrics key"
        return None
