"""Logging set-up: today's text lines, or one JSON object per line (``--log-format json``).

A JSON line holds ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
``pid``, and, where the code that logged gave them (``extra=``), ``sid``, ``socket``, ``user``,
``room``, ``namespace``, ``instance``, ``worker`` and ``reason``; an exception's traceback is
in ``exception``.

Secrets never reach a log line, whatever the format: :class:`Redactor` replaces the configured
secrets (JWT secret, API key, metrics key, the password of a Redis URL) and anything shaped like
a JWT with ``***`` in every record before it is formatted.
"""

from __future__ import annotations

import datetime
import logging
import re
import traceback
from collections.abc import Iterable
from typing import Any, Final

import orjson

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "Redactor", "configure"]

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


class Redactor(logging.Filter):
    """Replaces secrets, and anything shaped like a JWT, in a record's message with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would redact innocent text; a secret that short is refused elsewhere.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
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
        return True

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
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
