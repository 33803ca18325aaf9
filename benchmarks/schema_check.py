"""What an event schema costs per event: the check a client event or a publication goes through.

Prints, for a few schemas (small, typical, large), the CPU time of one check of a valid and of
an invalid payload (``EventSchema.issues``, the fastjsonschema-compiled function and the error
path), the look-up an event without a schema pays, and, for scale, the time to decode the
payload's JSON with orjson (what every client event costs before any check).

    .venv/bin/python benchmarks/schema_check.py [rounds]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from roomcast.schemas import EventSchema, EventSchemas, payload_of

SMALL = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
TYPICAL = {
    "type": "object",
    "required": ["text", "cursor"],
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "maxLength": 2000},
        "cursor": {
            "type": "object",
            "required": ["line", "col"],
            "properties": {
                "line": {"type": "integer", "minimum": 0},
                "col": {"type": "integer", "minimum": 0},
            },
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
    },
}
LARGE = {
    "type": "object",
    "required": ["items"],
    "properties": {
        "items": {
            "type": "array",
            "maxItems": 100,
            "items": {
                "type": "object",
                "required": ["id", "qty", "sku"],
                "properties": {
                    "id": {"type": "integer"},
                    "qty": {"type": "integer", "minimum": 1},
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "note": {"type": ["string", "null"], "maxLength": 200},
                },
            },
        }
    },
}

CASES: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("small", SMALL, {"text": "hello"}, {"text": 5}),
    (
        "typical",
        TYPICAL,
        {"text": "hello world " * 10, "cursor": {"line": 3, "col": 14}, "tags": ["a", "b"]},
        {"text": 5, "cursor": {"line": -1}, "extra": 1},
    ),
    (
        "large (20 items)",
        LARGE,
        {"items": [{"id": i, "qty": 2, "sku": "ABC-1234", "note": None} for i in range(20)]},
        {"items": [{"id": i, "qty": 2, "sku": "ABC-1234"} for i in range(19)] + [{"id": 1}]},
    ),
]


def per_call_us(fn: Callable[[], object], rounds: int) -> float:
    """Median over 5 runs of the CPU time of one call, in microseconds."""
    runs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            fn()
        runs.append((time.process_time() - start) / rounds * 1e6)
    return sorted(runs)[2]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    print(f"CPU time per event, median of 5 runs of {rounds:,} (Python {sys.version.split()[0]})")
    print(f"{'schema':<18} {'valid':>9} {'invalid':>9} {'json decode':>12}")
    for name, schema, good, bad in CASES:
        compiled = EventSchema(name, schema)
        assert compiled.issues(good) is None and compiled.issues(bad) is not None
        raw = orjson.dumps([name, good])
        valid = per_call_us(lambda c=compiled, g=good: c.issues(payload_of([g])), rounds)
        invalid = per_call_us(lambda c=compiled, b=bad: c.issues(payload_of([b])), rounds)
        decode = per_call_us(lambda r=raw: orjson.loads(r), rounds)
        print(f"{name:<18} {valid:>7.2f}µs {invalid:>7.2f}µs {decode:>10.2f}µs")
    schemas = EventSchemas({"chat": SMALL})
    lookup = per_call_us(lambda: schemas.get("typing"), rounds)
    print(f"{'no schema (lookup)':<18} {lookup:>7.2f}µs")


if __name__ == "__main__":
    main()
