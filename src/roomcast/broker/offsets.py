"""Stream offsets: Redis-style ``<milliseconds>-<sequence>`` ids, compared as integer pairs."""

from __future__ import annotations

from typing import Final

CLOCK_MARGIN_MS: Final = 5_000
"""Allowed disagreement between the gateway's clock and Redis's (offsets carry Redis time)."""


class OffsetError(ValueError):
    """An offset that is not ``<ms>-<seq>``."""


def parse_offset(offset: str) -> tuple[int, int]:
    """Parse ``"1700000000000-3"`` into ``(1700000000000, 3)``; ``"0"`` or ``""`` is the start."""
    if offset in ("", "0", "0-0"):
        return (0, 0)
    ms, sep, seq = offset.partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        raise OffsetError(f"invalid offset {offset[:40]!r}")
    return (int(ms), int(seq) if sep else 0)


class OffsetClock:
    """Strictly increasing ``<ms>-<seq>`` ids, like Redis ``XADD *`` on one stream."""

    __slots__ = ("_ms", "_seq")

    def __init__(self) -> None:
        self._ms = 0
        self._seq = 0

    def next(self, now_ms: int) -> str:
        if now_ms > self._ms:
            self._ms, self._seq = now_ms, 0
        else:
            self._seq += 1
        return f"{self._ms}-{self._seq}"
