"""Room patterns: what a token's ``rooms`` and ``publish`` claims grant.

A pattern is split on ``:`` into segments, like a room name. A segment is one of:

- ``*``: exactly one segment of the room, which must not be empty;
- ``**``: one or more segments (never zero), none of them empty;
- anything else: that segment, character for character (``?``, ``[`` and a ``*`` inside a
  longer segment are plain characters, and since room names cannot hold them, such a segment
  matches nothing).

So ``team:7:*`` grants ``team:7:general`` but not ``team:7:a:b`` nor ``team:7``;
``team:7:**`` grants both ``team:7:general`` and ``team:7:a:b``, still not ``team:7``;
``**`` grants every room without an empty segment (``doc:``, ``a::b`` and ``:x`` are valid
room names that no wildcard grants: a claim names them to grant them). The matcher works on
segments (no regular expression), in time proportional to pattern segments times room
segments, whatever the number of ``**``.

Standalone: imports only the standard library.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["ANY", "ANY_MANY", "compile_pattern", "matches", "pattern_problem"]

ANY = "*"
ANY_MANY = "**"
_SEPARATOR = ":"
_COMPILED_CACHE = 4096


@lru_cache(maxsize=_COMPILED_CACHE)
def compile_pattern(pattern: str) -> tuple[str, ...]:
    """Return the segments of ``pattern`` (cached: tokens repeat their patterns)."""
    return tuple(pattern.split(_SEPARATOR))


def matches(room: str, pattern: str) -> bool:
    """Return whether ``pattern`` grants ``room`` (see the module docstring)."""
    if ANY not in pattern:
        return room == pattern
    return _match_segments(room.split(_SEPARATOR), compile_pattern(pattern))


def _match_segments(room: list[str], pattern: tuple[str, ...]) -> bool:
    # reachable[j]: the pattern's first i segments can match the room's first j segments.
    n = len(room)
    reachable = [True] + [False] * n
    for segment in pattern:
        step = [False] * (n + 1)
        if segment == ANY_MANY:
            # one or more non-empty room segments after a reachable position
            run = False
            for j in range(1, n + 1):
                if not room[j - 1]:
                    run = False
                    continue
                run = run or reachable[j - 1]
                step[j] = run
        elif segment == ANY:
            for j in range(1, n + 1):
                step[j] = reachable[j - 1] and room[j - 1] != ""
        else:
            for j in range(1, n + 1):
                step[j] = reachable[j - 1] and room[j - 1] == segment
        if not any(step):
            return False
        reachable = step
    return reachable[n]


def pattern_problem(pattern: str) -> str | None:
    """Return why ``pattern`` can never grant a room, or None if it can.

    Used where a pattern is written (``roomcast token``), so a pattern that would silently
    grant nothing is refused there.
    """
    if not pattern:
        return "pattern '' grants nothing"
    for segment in compile_pattern(pattern):
        if segment in (ANY, ANY_MANY):
            continue
        if ANY in segment:
            return (
                f"pattern {pattern!r}: '*' and '**' are wildcards only as a whole "
                f"':'-separated segment, not in {segment!r}"
            )
        for char in segment:
            if not (char.isascii() and (char.isalnum() or char in "_.@/-")):
                return f"pattern {pattern!r}: {char!r} cannot appear in a room name"
    return None
