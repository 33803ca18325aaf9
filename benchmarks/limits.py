"""What the rate limits cost: ns per check on the hot path, µs per connect for the user limits.

Prints, per client event, the check a socket pays with its limits off (a ``None`` test) and on
(a token-bucket take that allows the event), the refusal path (a take that refuses, the
overflow count, the metric and the bounded log), and, for scale, an orjson decode of a small
event (what every client event costs before any check).  Then, per connect, the per-user
admission on the memory broker and, with ``--redis-url``, on Redis (one script, one round
trip).  Each per-event figure is the median CPU time of 5 runs (``timeit``, loop overhead
included: about 10 ns).

    .venv/bin/python benchmarks/limits.py [--rounds N] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
import uuid

import orjson

from roomcast.broker.base import Broker, UserQuota
from roomcast.broker.memory import MemoryBroker
from roomcast.limits import Bucket, Rate, Refusals
from roomcast.metrics import Metrics


def ns_per(statement: str, rounds: int, **names: object) -> float:
    """Median over 5 runs of the CPU time of one execution of ``statement``, in ns."""
    timer = timeit.Timer(statement, timer=time.process_time, globals=names)
    runs = timer.repeat(repeat=5, number=rounds)
    return sorted(runs)[2] / rounds * 1e9


def hot_path(rounds: int) -> None:
    allowing = Bucket(Rate(per_second=1e12, burst=1e12))
    refusing = Bucket(Rate(per_second=1e-9, burst=1))
    refusing.take()
    refusals = Refusals(Metrics())
    event = orjson.dumps(["cursor", {"line": 3, "col": 14}])
    rows = [
        ("limits off (a None test)", ns_per("b is not None and not b.take()", rounds, b=None)),
        ("take, allowed", ns_per("b.take()", rounds, b=allowing)),
        ("take, refused", ns_per("b.take()", rounds, b=refusing)),
        ("overflow count (refused)", ns_per("b.overflowed(10.0)", rounds, b=refusing)),
        ("retry-after (refused, acked)", ns_per("b.retry_after_ms()", rounds, b=refusing)),
        ("metric + bounded log (refused)", ns_per("r.refused('events', 's')", rounds, r=refusals)),
        ("for scale: orjson.loads(event)", ns_per("loads(e)", rounds, loads=orjson.loads, e=event)),
    ]
    print(
        f"CPU time per client event, median of 5 runs of {rounds:,} "
        f"(Python {sys.version.split()[0]})"
    )
    for name, ns in rows:
        print(f"  {name:<32} {ns:>8.1f} ns")


async def admissions(broker: Broker, label: str, count: int) -> None:
    quota = UserQuota(per_window=1_000_000, window_ms=60_000, concurrent=1_000_000, ttl_ms=30_000)
    user = f"bench-{uuid.uuid4().hex[:8]}"
    await broker.admit_user(user, "warm-up", quota)
    runs, cpu = [], []
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.process_time()
        for index in range(count):
            await broker.admit_user(user, f"m{index}", quota)
        runs.append((time.perf_counter() - start) / count * 1e6)
        cpu.append((time.process_time() - start_cpu) / count * 1e6)
    held = [(user, f"m{index}") for index in range(count)]
    start = time.perf_counter()
    await broker.keep_users(held, 30_000)
    keep = (time.perf_counter() - start) / count * 1e6
    start = time.perf_counter()
    await broker.release_users(held)
    release = (time.perf_counter() - start) / count * 1e6
    print(
        f"  {label:<8} admit {sorted(runs)[2]:>6.1f} µs (this process's CPU {sorted(cpu)[2]:>5.1f} "
        f"µs)   keep {keep:>5.2f} µs   release {release:>5.2f} µs  (keep, release: batched)"
    )


async def per_connect(redis_url: str | None, count: int) -> None:
    print(f"per connection with both user limits on (one user, {count:,} connections, wall time)")
    memory = MemoryBroker()
    await admissions(memory, "memory", count)
    if redis_url:
        from roomcast.broker.redis import RedisBroker

        redis = RedisBroker(redis_url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            await admissions(redis, "redis", count)
        finally:
            await redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1_000_000)
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    hot_path(args.rounds)
    asyncio.run(per_connect(args.redis_url, args.connects))


if __name__ == "__main__":
    main()
