"""Draining many polling sessions: each close costs O(1), and old farewells expire."""

from __future__ import annotations

import asyncio
import time

from roomcast.connection import Connection, Flusher
from roomcast.engine import EngineOptions, EngineServer
from roomcast.metrics import Metrics
from roomcast.transport.http import Request
from roomcast.types import SessionId


class _Quiet:
    """A raw Engine.IO application that does nothing."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def on_message(self, message: str | bytes) -> None:
        return

    def on_close(self, reason: str) -> None:
        return


def _engine(ping_interval_ms: int, ping_timeout_ms: int) -> EngineServer:
    options = EngineOptions(ping_interval_ms=ping_interval_ms, ping_timeout_ms=ping_timeout_ms)
    return EngineServer(options, _Quiet, Metrics(), Flusher())


async def test_closing_twenty_thousand_polling_sessions_is_linear() -> None:
    """20,000 polling sessions closed at once (a drain) each keep their CLOSE packet for the
    next poll, in well under a second (17 s before: the farewell map was rebuilt per close)."""
    engine = _engine(25_000, 20_000)
    request = Request("GET", "/socket.io/", {}, {})
    for i in range(20_000):
        engine.add_session(SessionId(f"s{i}"), request)
    started = time.perf_counter()
    engine.close_all("server shutting down")
    elapsed = time.perf_counter() - started
    assert len(engine.farewells) == 20_000 and not engine.sessions
    assert engine.farewells["s0"][1].endswith("1")  # the CLOSE packet waits for the poll
    assert elapsed < 2, f"20,000 closes took {elapsed:.2f} s"


async def test_expired_farewells_are_forgotten() -> None:
    """A farewell nobody collected is dropped once pingInterval + pingTimeout have passed."""
    engine = _engine(5, 5)
    request = Request("GET", "/socket.io/", {}, {})
    for i in range(3):
        engine.add_session(SessionId(f"old{i}"), request).close("test")
    await asyncio.sleep(0.05)
    engine.add_session(SessionId("new"), request).close("test")
    assert set(engine.farewells) == {"new"}
