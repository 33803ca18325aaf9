"""Event payload schemas: JSON Schema (draft-07) per event name, compiled once, checked per event.

The schemas come from the file named by ``--event-schemas`` (one JSON object, event name to
schema) and from ``@app.on(event, schema=...)``. Each is compiled by fastjsonschema into a
Python function when it is loaded, so a check costs a few microseconds (see
``benchmarks/schema_check.py``). What a schema checks, the *payload*, is the event's one
argument, or the array of its arguments when it has none or several: exactly what an upstream
event carries as ``data``, and what a publication carries as ``data``.

Draft-07 is the JSON Schema dialect that AsyncAPI 3.0 embeds, so the same schemas go into the
document ``roomcast asyncapi`` writes. ``$ref`` may point only inside the schema (no network,
no files). Validation stops at the first failing keyword, so ``details`` names one path.

Standalone: imports only the standard library, orjson and fastjsonschema.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import fastjsonschema
import orjson

__all__ = [
    "DRAFT_07",
    "EventSchema",
    "EventSchemas",
    "InvalidPayloadError",
    "Issue",
    "SchemaError",
    "payload_of",
]

DRAFT_07: Final = "http://json-schema.org/draft-07/schema#"
_MESSAGE_LIMIT: Final = 200
_REMOTE_SCHEMES: Final = ("http", "https", "file", "ftp", "urn")


class SchemaError(ValueError):
    """A schema cannot be used; the message names the event and why."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One failing place of a payload: a JSON Pointer (``""`` is the payload itself)."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class InvalidPayloadError(ValueError):
    """A payload does not match its event's schema."""

    code: Final = "invalid_payload"

    def __init__(self, event: str, details: list[Issue]) -> None:
        first = details[0] if details else Issue("", "invalid")
        where = f" at {first.path}" if first.path else ""
        super().__init__(f"payload of event {event[:60]!r} is invalid{where}: {first.message}")
        self.event = event
        self.details = details

    def detail_dicts(self) -> list[dict[str, str]]:
        return [issue.as_dict() for issue in self.details]


def payload_of(args: list[Any]) -> Any:
    """What a schema checks of an event's arguments: the one argument, else the array."""
    return args[0] if len(args) == 1 else args


def _refuse_remote(uri: str) -> Any:
    raise fastjsonschema.JsonSchemaDefinitionException(
        f"$ref {uri!r} is not inside the schema; remote references are not fetched"
    )


_HANDLERS: Final[dict[str, Callable[[str], Any]]] = dict.fromkeys(_REMOTE_SCHEMES, _refuse_remote)


def _outside_refs(schema: object) -> list[str]:
    """The ``$ref`` values of ``schema`` that do not point inside it (``#...``): fastjsonschema
    would fetch some of them (a ``data:`` URI, say), whatever scheme handlers it is given."""
    found: list[str] = []
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                found.append(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _pointer(path: list[str]) -> str:
    """fastjsonschema's ``['data', 'a', '1']`` as the JSON Pointer ``/a/1``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path[1:])


class EventSchema:
    """One event's schema, compiled."""

    __slots__ = ("_check", "event", "schema")

    def __init__(self, event: str, schema: object) -> None:
        if not isinstance(schema, dict | bool):
            raise SchemaError(
                f"schema of event {event!r} must be a JSON object or a boolean, "
                f"got {type(schema).__name__}"
            )
        if isinstance(schema, dict):
            dialect = schema.get("$schema")
            if dialect is not None and (not isinstance(dialect, str) or "draft-07" not in dialect):
                raise SchemaError(
                    f"schema of event {event!r} names $schema {dialect!r}: event schemas are "
                    f"JSON Schema draft-07 (the dialect AsyncAPI 3.0 embeds); use {DRAFT_07!r} "
                    "or leave $schema out"
                )
        outside = _outside_refs(schema)
        if outside:
            raise SchemaError(
                f"schema of event {event!r} refers outside itself ({outside[0]!r:.80}): "
                "a $ref must start with '#'"
            )
        try:
            # use_default=False: a check never changes the payload it is given.
            self._check = fastjsonschema.compile(schema, handlers=_HANDLERS, use_default=False)
        except fastjsonschema.JsonSchemaDefinitionException as exc:
            raise SchemaError(f"schema of event {event!r} is not usable: {exc}") from exc
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
            # The code generator trips on some malformed keywords before it can name them.
            raise SchemaError(
                f"schema of event {event!r} is not usable: {type(exc).__name__}: {exc}"
            ) from exc
        self.event = event
        self.schema = schema

    def issues(self, payload: Any) -> list[Issue] | None:
        """None if ``payload`` matches, else where and why it does not."""
        try:
            self._check(payload)
        except (ValueError, OverflowError, TypeError, RecursionError) as exc:
            if not isinstance(exc, fastjsonschema.JsonSchemaValueException):
                # The generated check itself failed on this value (a multipleOf of a huge
                # number, say): the payload is not one the schema can vouch for.
                return [Issue("", f"cannot be checked: {type(exc).__name__}")]
            message = str(exc.message)
            name = str(exc.name)
            if message.startswith(name + " "):
                message = message[len(name) + 1 :]
            if len(message) > _MESSAGE_LIMIT:
                message = message[: _MESSAGE_LIMIT - 3] + "..."
            return [Issue(_pointer([str(p) for p in exc.path or ["data"]]), message)]
        return None

    def check(self, payload: Any) -> None:
        """Raise :class:`InvalidPayloadError` unless ``payload`` matches."""
        issues = self.issues(payload)
        if issues is not None:
            raise InvalidPayloadError(self.event, issues)


class EventSchemas(Mapping[str, EventSchema]):
    """Event name to compiled schema: what ``--event-schemas`` names."""

    __slots__ = ("_schemas", "source")

    def __init__(self, schemas: Mapping[str, object] | None = None, *, source: str = "") -> None:
        self.source = source
        self._schemas: dict[str, EventSchema] = {}
        for event, schema in (schemas or {}).items():
            if not isinstance(event, str) or not event:
                raise SchemaError(f"event names must be non-empty strings, got {event!r}")
            self._schemas[event] = EventSchema(event, schema)

    @classmethod
    def load(cls, path: str) -> EventSchemas:
        """Read and compile the schema file at ``path``; errors name the file and the event."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise SchemaError(f"cannot read event_schemas file {path!r}: {exc.strerror}") from exc
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SchemaError(f"event_schemas file {path!r} is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise SchemaError(
                f"event_schemas file {path!r} must hold one JSON object (event name to schema)"
            )
        try:
            return cls(value, source=path)
        except SchemaError as exc:
            raise SchemaError(f"event_schemas file {path!r}: {exc}") from exc

    def __getitem__(self, event: str) -> EventSchema:
        return self._schemas[event]

    def get(self, event: str, default: Any = None) -> Any:
        # The hot path asks this for every client event: a dict look-up, not Mapping's
        # __getitem__ and KeyError.
        return self._schemas.get(event, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._schemas)

    def __len__(self) -> int:
        return len(self._schemas)

    def issues(self, event: str, payload: Any) -> list[Issue] | None:
        """None if ``event`` has no schema or ``payload`` matches it."""
        schema = self._schemas.get(event)
        return None if schema is None else schema.issues(payload)

    def check(self, event: str, payload: Any) -> None:
        """Raise :class:`InvalidPayloadError` if ``event`` has a schema ``payload`` fails."""
        schema = self._schemas.get(event)
        if schema is not None:
            schema.check(payload)
