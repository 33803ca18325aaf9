"""The worker supervisor: a crashing worker is restarted with a growing wait, then given up."""

from __future__ import annotations

import itertools
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from roomcast.workers import supervise


def _crash(log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{time.monotonic()}\n")
    raise SystemExit(3)


def test_a_worker_that_keeps_crashing_is_restarted_with_backoff_then_given_up(
    tmp_path: Path,
) -> None:
    """Each restart waits twice as long as the one before; after four quick crashes in a row
    the supervisor stops and returns 1 (it restarted every 0.2 s forever before)."""
    log = tmp_path / "starts"
    context = multiprocessing.get_context("fork")

    def start(index: int) -> BaseProcess:
        process = context.Process(target=_crash, args=(str(log),))
        process.start()
        return process

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    started = time.monotonic()
    try:
        status = supervise(start, 1, quick_crash_s=5.0, max_quick_crashes=4, backoff_s=(0.2, 10.0))
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert status == 1
    starts = [float(line) for line in log.read_text().split()]
    assert len(starts) == 4, starts
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # waits of 0.2, 0.4 and 0.8 s (plus process start-up and the 0.1 s poll)
    for gap, wait in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert wait <= gap < wait + 1.0, gaps
    assert time.monotonic() - started < 10
