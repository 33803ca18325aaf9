"""A server subprocess's output, read by a thread, so a test waits on it with a deadline.

``proc.stdout.readline()`` in the test itself blocks past any deadline when the line it waits
for never comes (the test run then hangs instead of failing); the thread also keeps the pipe
drained for as long as the process writes to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import IO


class ProcessOutput:
    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []
        """``time.monotonic()`` when each line was read."""
        self._ended = False
        self._changed = threading.Condition()
        self._stream = stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            with self._changed:
                self.times.append(time.monotonic())
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, what: str, done: Callable[[list[str]], bool], timeout: float) -> list[str]:
        """The lines so far, once ``done(lines)``; fail with the output if it is not within
        ``timeout`` seconds or the process closed its output first."""
        with self._changed:
            self._changed.wait_for(lambda: done(self.lines) or self._ended, timeout)
            lines = list(self.lines)
        assert done(lines), f"no {what} within {timeout} s; output so far:\n{''.join(lines)}"
        return lines

    def close(self, timeout: float = 5.0) -> None:
        """Once the process ended: read to the end, then close the stream."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._stream.close()
