"""CPU cost of a broker's publish -> delivery path, in one process, without sockets or HTTP.

Starts N brokers (as N instances would), subscribes each to 1,000 rooms, publishes RATE
publications per second round-robin over the rooms and the brokers for SECONDS, waits until every
broker delivered every publication, and prints the process CPU time per publication (user and
system). With N = 2 the difference to N = 1 is what one more instance on the same rooms costs.

    .venv/bin/python benchmarks/broker_path.py redis://127.0.0.1:6379/0 --instances 2
    .venv/bin/python benchmarks/broker_path.py memory

Pin it (``taskset -c 0``) for steadier figures. The Redis server's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from typing import Any

import uvloop

from roomcast.broker.base import Broker, Publication, PublishRequest
from roomcast.broker.memory import MemoryBroker
from roomcast.broker.redis import RedisBroker

ROOMS = 1000


async def measure(url: str, instances: int, rate: float, seconds: float) -> str:
    prefix = f"brokerpath{os.getpid()}"
    total = int(rate * seconds)
    counts = [0] * instances
    left = [total * instances]
    all_delivered = asyncio.Event()
    brokers: list[Broker] = []
    for i in range(instances):
        broker: Broker = MemoryBroker() if url == "memory" else RedisBroker(url, prefix=prefix)

        def count(_publication: Publication, i: int = i) -> None:
            counts[i] += 1
            left[0] -= 1
            if left[0] == 0:
                all_delivered.set()

        await broker.start(count)
        brokers.append(broker)
    rooms = [f"room-{j}" for j in range(ROOMS)]
    for broker in brokers:
        for room in rooms:
            await broker.subscribe(room)
    data: Any = {"ts": 0, "seq": 0, "room": "room-0", "pad": "x" * 120}
    tasks: list[asyncio.Task[Any]] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            request = PublishRequest(room=rooms[sent % ROOMS], event="e", data=data)
            tasks.append(asyncio.create_task(brokers[sent % instances].publish(request)))
            sent += 1
        await asyncio.sleep(0.001)
    try:
        await asyncio.wait_for(all_delivered.wait(), 30)
    except TimeoutError:
        print(f"not everything was delivered within 30 s: {counts} of {total} each")
    after = resource.getrusage(resource.RUSAGE_SELF)
    failed = [t.exception() for t in tasks if t.done() and t.exception() is not None]
    if failed:
        print(f"{len(failed)} publishes failed, the first with: {failed[0]!r}")
    for broker in brokers:
        await broker.stop()
    user = (after.ru_utime - before.ru_utime) / sent * 1e6
    system = (after.ru_stime - before.ru_stime) / sent * 1e6
    return (
        f"{url if url == 'memory' else 'redis'}, {instances} instance(s): {sent} publications, "
        f"delivered {counts}; CPU per publication {user + system:.1f} us "
        f"(user {user:.1f}, system {system:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a redis:// URL, or 'memory'")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2000.0, help="publications per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.url == "memory" and args.instances != 1:
        parser.error("memory brokers do not share publications: use --instances 1")
    print(uvloop.run(measure(args.url, args.instances, args.rate, args.seconds)))


if __name__ == "__main__":
    main()
