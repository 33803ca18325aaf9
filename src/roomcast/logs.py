"""Logging set-up: today's text lines, or one JSON object per line (``--log-format json``).

A JSON line holds ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
``pid``, and, where they apply, ``sid``, ``socket``, ``user``, ``room``, ``namespace``,
``instance``, ``worker`` and ``reason``; an exception's traceback is in ``exception``. The
context comes from the call (``extra=``), else from :data:`log_context` (set while a socket's
event handler runs, so an application's own log calls carry the socket and user), else from
:func:`identify` (this process's ``instance`` and ``worker``, on every line).

Secrets never reach a log line, whatever the format: :class:`Redactor` replaces the configured
secrets (JWT secret, API key, metrics key, the password of a Redis URL) and anything shaped like
a JWT with ``***`` in every record before it is formatted.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "Redactor", "configure", "identify", "log_context"]

CONTEXT_FIELDS: Final = (
    "sid",
    "socket",
    "user",
    "room",
    "namespace",
    "instance",
    "worker",
    "reason",
)
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

log_context: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "roomcast_log_context", default=None
)
"""Context fields for every record logged in the current context (a task copies it when it is
created): set it at the start of a task that works for one socket."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return orjson.dumps(line, default=str).decode()


class _Context(logging.Filter):
    """Fills the context fields a record lacks from :data:`log_context`, then from the
    process's own (:func:`identify`)."""

    def __init__(self) -> None:
        super().__init__()
        self.process: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        current = log_context.get()
        if current is not None:
            for name, value in current.items():
                if fields.get(name) is None:
                    fields[name] = value
        for name, value in self.process.items():
            if fields.get(name) is None:
                fields[name] = value
        return True


_CONTEXT: Final = _Context()


def identify(*, instance: str, worker: str = "") -> None:
    """Put this process's ``instance`` (its broker's instance id: the ``instance`` of the server
    API's answers) and, with ``--workers N``, its ``worker`` (``"00"``, ...) on every record."""
    _CONTEXT.process = {"instance": instance, **({"worker": worker} if worker else {})}


class Redactor(logging.Filter):
    """Replaces secrets, and anything shaped like a JWT, in a record's message with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would redact innocent text (production refuses keys that short).
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        # A log call whose arguments do not fit its format must not raise into its caller:
        # the handler formats the record later and reports it through handleError, as the
        # standard library does without this filter.
        with contextlib.suppress(TypeError, ValueError, KeyError):
            self._redact_record(record)
        return True

    def _redact_record(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        clean = self.redact(message)
        if clean is not message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback is formatted later from the exception: redact its text now.
            text = "".join(traceback.format_exception(*record.exc_info))
            redacted = self.redact(text)
            if redacted is not text:
                record.exc_info = None
                record.msg = f"{record.msg}\n{redacted.rstrip()}"

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced (the same object when nothing was found)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if "eyJ" in text:
            text = _JWT.sub("***", text)
        return text


def configure(level: str, fmt: str, secrets: Iterable[str]) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``), secrets redacted."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_CONTEXT)
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
