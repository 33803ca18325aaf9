"""The envelope: how one :class:`Publication` is written as the fields of one stream entry.

This module is the only codec for both directions.  :func:`encode_envelope` turns a publication
into ``{field: value}`` strings for ``XADD``; :func:`decode_envelope` turns the fields of a
stream entry, whoever wrote it, back into a publication or raises :class:`EnvelopeError`
naming the bad field.  ``envelope.schema.json`` beside this file describes the same fields for
publishers written in other languages.

Stream fields are strings, so ``data`` is a JSON text and ``published_at`` a decimal number of
milliseconds.  Fields this version does not know are ignored, so publishers may add their own.

Binary data (``bytes`` anywhere in ``data``) is stored as Socket.IO sends it: in the ``data``
JSON each ``bytes`` value is a placeholder ``{"_placeholder":true,"num":N}``, ``attachments``
gives their count and field ``attachment:N`` holds the N-th one's bytes as they are (stream
field values are binary-safe).  Placeholders mean something only in an entry that has
``attachments``, so entries without it read exactly as before.  In a feed message, whose body
is JSON, the attachment fields are base64.

A plain ``XADD <stream> * room r event e data '{}'`` is a whole envelope: without ``id`` the
publication id is the stream entry id, and without ``published_at`` its time is the entry id's
milliseconds.  Without ``namespace`` the room is one of the main namespace ``/``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import orjson

from roomcast.auth import InvalidRoomError, validate_room
from roomcast.broker.base import Publication
from roomcast.broker.topics import MAIN, InvalidNamespaceError, topic, validate_namespace
from roomcast.protocol.errors import EventNameError, SocketIOError
from roomcast.protocol.socketio import (
    MAX_EVENT_NAME,
    PlaceholderError,
    check_depth,
    check_event_name,
    dumps_binary,
    reconstruct,
)

__all__ = [
    "ATTACHMENT_FIELD",
    "FIELDS",
    "MAX_ATTACHMENTS",
    "MAX_EVENT_LENGTH",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "EnvelopeError",
    "check_traceparent",
    "decode_data",
    "decode_envelope",
    "decode_feed",
    "encode_data",
    "encode_envelope",
    "encode_feed",
]

Fields: TypeAlias = dict[str, str | bytes]
"""An envelope as ``{field: value}``: text, and the raw bytes of attachment fields."""

REQUIRED_FIELDS: Final = ("room", "event", "data")
OPTIONAL_FIELDS: Final = (
    "id",
    "published_at",
    "namespace",
    "idempotency_key",
    "traceparent",
    "exclude_sid",
    "origin",
    "attachments",
)
FIELDS: Final = REQUIRED_FIELDS + OPTIONAL_FIELDS
ATTACHMENT_FIELD: Final = "attachment:{}"
"""The name of attachment field N (``attachment:0``, ``attachment:1``, ...)."""
MAX_ATTACHMENTS: Final = 256
"""``bytes`` values one publication may hold."""
_COUNT_RE: Final = re.compile(r"\A[1-9][0-9]{0,2}\Z")
MAX_EVENT_LENGTH: Final = MAX_EVENT_NAME
MAX_ID_LENGTH: Final = 128
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 256
MAX_SID_LENGTH: Final = 128
_TRACEPARENT_RE: Final = re.compile(r"\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
_MS_RE: Final = re.compile(r"\A[0-9]{1,15}\Z")
_SHOW_LIMIT: Final = 60


MAX_DATA_NESTING: Final = 64
"""How deep publication data may nest (client packets default to 32): deeper data could be
stored but not sent (orjson refuses more than 254 levels), which would break recovery."""


class EnvelopeError(ValueError):
    """A stream entry, or a publication to encode, has a missing or bad field."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def encode_data(data: object) -> tuple[str, list[bytes]]:
    """Return ``data`` as compact JSON text and its attachments: each ``bytes`` value
    (``bytearray``, ``memoryview``) becomes a placeholder and its bytes an attachment.
    Raise :class:`EnvelopeError` if ``data`` is neither JSON nor bytes, or if it holds
    bytes beside an object that looks like a placeholder (it would read back as bytes)."""
    try:
        return orjson.dumps(data).decode(), []
    except orjson.JSONEncodeError as exc:
        error = exc
    attachments: list[bytes] = []
    try:
        text = dumps_binary(data, attachments)
    except PlaceholderError as exc:
        raise EnvelopeError(str(exc)) from None
    except TypeError:  # orjson's JSONEncodeError, or bytes' default hook
        raise EnvelopeError(f"data: not json-serializable: {error}") from None
    if not attachments:
        raise EnvelopeError(f"data: not json-serializable: {error}")
    if len(attachments) > MAX_ATTACHMENTS:
        raise EnvelopeError(f"data: more than {MAX_ATTACHMENTS} bytes values")
    return text.decode(), attachments


def decode_data(text: str, attachments: list[bytes] | None = None) -> Any:
    """The data of :func:`encode_data`'s JSON text and attachments; with attachments, every
    placeholder is replaced by its bytes.  Raise :class:`EnvelopeError` naming the problem."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise EnvelopeError(f"data: invalid json {_show(text)}") from None
    try:
        check_depth(value, MAX_DATA_NESTING)
    except SocketIOError as exc:
        raise EnvelopeError(f"data: {exc}") from None
    if attachments is None:
        return value
    try:
        return reconstruct(value, attachments)
    except SocketIOError as exc:
        raise EnvelopeError(f"data: {exc}") from None


def encode_envelope(publication: Publication) -> Fields:
    """Return the stream entry fields of ``publication`` (its ``offset`` is not part of them).

    Raise :class:`EnvelopeError` (or :class:`~roomcast.auth.InvalidRoomError`, also a
    ``ValueError``) when a field could not be decoded back, so nothing unreadable is written.
    """
    validate_room(publication.room)
    _check_event(publication.event)
    _check_text("id", publication.id, MAX_ID_LENGTH)
    if publication.published_at_ms < 0:
        raise EnvelopeError(
            f"published_at: must not be negative, got {publication.published_at_ms}"
        )
    data, attachments = encode_data(publication.data)
    fields: Fields = {
        "room": publication.room,
        "event": publication.event,
        "data": data,
        "id": publication.id,
        "published_at": str(publication.published_at_ms),
    }
    if attachments:
        fields["attachments"] = str(len(attachments))
        for num, attachment in enumerate(attachments):
            fields[ATTACHMENT_FIELD.format(num)] = attachment
    if publication.namespace != MAIN:
        try:
            fields["namespace"] = validate_namespace(publication.namespace)
        except InvalidNamespaceError as exc:
            raise EnvelopeError(f"namespace: {exc}") from None
    if publication.idempotency_key is not None:
        _check_text("idempotency_key", publication.idempotency_key, MAX_IDEMPOTENCY_KEY_LENGTH)
        fields["idempotency_key"] = publication.idempotency_key
    if publication.traceparent is not None:
        _check_traceparent(publication.traceparent)
        fields["traceparent"] = publication.traceparent
    if publication.exclude_sid is not None:
        _check_text("exclude_sid", publication.exclude_sid, MAX_SID_LENGTH)
        fields["exclude_sid"] = publication.exclude_sid
    if publication.origin is not None:
        _check_text("origin", publication.origin, MAX_ID_LENGTH)
        fields["origin"] = publication.origin
    return fields


def decode_envelope(
    entry_id: str,
    fields: Mapping[str, str | bytes] | Mapping[bytes, bytes],
    *,
    room: str | None = None,
) -> Publication:
    """Return the publication stored as stream entry ``entry_id`` with ``fields``.

    ``room``, when given, is the topic (see :mod:`roomcast.broker.topics`) whose stream the
    entry was read from: the entry's ``namespace`` and ``room`` fields must name it.  Raise
    :class:`EnvelopeError` naming the first bad field.
    """
    text = _as_text(fields)
    for name in REQUIRED_FIELDS:
        if name not in text:
            raise EnvelopeError(f"{name}: missing")
    entry_room = text["room"]
    namespace = text.get("namespace", MAIN)
    try:
        validate_namespace(namespace)
    except InvalidNamespaceError as exc:
        raise EnvelopeError(f"namespace: {exc}") from None
    if room is not None:
        if topic(namespace, entry_room) != room:
            raise EnvelopeError(
                f"room: entry names {_show(entry_room)} of namespace {_show(namespace)}, "
                f"stream is {_show(room)}"
            )
    else:
        try:
            validate_room(entry_room)
        except InvalidRoomError as exc:
            raise EnvelopeError(f"room: {exc}") from None
    event = _check_event(text["event"])
    data = decode_data(text["data"], _attachments(text, fields))
    publication_id = _check_text("id", text.get("id", entry_id), MAX_ID_LENGTH)
    published_at = text.get("published_at")
    if published_at is None:  # a plain XADD: the entry id holds the time
        published_at = entry_id.partition("-")[0]
    if _MS_RE.match(published_at) is None:
        raise EnvelopeError(f"published_at: not a number of milliseconds: {_show(published_at)}")
    idempotency_key = _optional(text, "idempotency_key", MAX_IDEMPOTENCY_KEY_LENGTH)
    traceparent = text.get("traceparent")
    if traceparent is not None:
        _check_traceparent(traceparent)
    return Publication(
        room=entry_room,
        namespace=namespace,
        event=event,
        data=data,
        id=publication_id,
        offset=entry_id,
        idempotency_key=idempotency_key,
        traceparent=traceparent,
        published_at_ms=int(published_at),
        exclude_sid=_optional(text, "exclude_sid", MAX_SID_LENGTH),
        origin=_optional(text, "origin", MAX_ID_LENGTH),
    )


def _attachments(
    text: Mapping[str, str], fields: Mapping[str, str | bytes] | Mapping[bytes, bytes]
) -> list[bytes] | None:
    """The attachments of a binary entry (one with ``attachments``), else ``None``."""
    count = text.get("attachments")
    if count is None:
        return None
    if _COUNT_RE.match(count) is None or int(count) > MAX_ATTACHMENTS:
        raise EnvelopeError(f"attachments: not a count of 1-{MAX_ATTACHMENTS}: {_show(count)}")
    attachments: list[bytes] = []
    for num in range(int(count)):
        name = ATTACHMENT_FIELD.format(num)
        value = fields.get(name)  # type: ignore[call-overload]
        if value is None:
            value = fields.get(name.encode())  # type: ignore[call-overload]
        if isinstance(value, bytes):
            attachments.append(value)
        elif value is None:
            raise EnvelopeError(f"{name}: missing (attachments is {count})")
        else:
            raise EnvelopeError(f"{name}: must be bytes, got {type(value).__name__}")
    return attachments


def encode_feed(fields: Mapping[str, str | bytes]) -> str:
    """The fields of an entry as one JSON object: the body of a Redis feed message, which
    hands the entry to subscribed instances with its notification (see ``docs/redis.md``).
    Attachment fields are base64 in it."""
    try:
        return orjson.dumps(fields).decode()
    except orjson.JSONEncodeError:
        pass
    return orjson.dumps(
        {
            name: base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
            for name, value in fields.items()
        }
    ).decode()


def decode_feed(entry_id: str, body: bytes | str, *, room: str) -> Publication:
    """Return the publication a feed message carries for entry ``entry_id`` of ``room``.

    Raise :class:`EnvelopeError` if the body is not a JSON object of envelope fields."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise EnvelopeError(f"feed: invalid json {_show(body)}") from None
    if not isinstance(fields, dict):
        raise EnvelopeError(f"feed: not a json object: {_show(fields)}")
    if "attachments" in fields:
        for name, value in fields.items():
            if name.startswith("attachment:"):
                if not isinstance(value, str):
                    raise EnvelopeError(f"feed: {name} must be base64 text")
                try:
                    fields[name] = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise EnvelopeError(f"feed: {name} is not base64") from None
    return decode_envelope(entry_id, fields, room=room)


_NAMES: Final[dict[str | bytes, str]] = {
    **{name: name for name in FIELDS},
    **{name.encode(): name for name in FIELDS},
}
"""Known field names, as ``str`` or as the ``bytes`` a Redis reply holds."""


def _as_text(
    fields: Mapping[str, str | bytes] | Mapping[bytes, bytes],
) -> dict[str, str]:
    """Decode the known fields to ``str``; a field that is not UTF-8 is an error."""
    text: dict[str, str] = {}
    for raw_name, raw_value in fields.items():
        name = _NAMES.get(raw_name)
        if name is None:
            continue
        if isinstance(raw_value, bytes):
            try:
                text[name] = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise EnvelopeError(f"{name}: not utf-8 text") from None
        elif isinstance(raw_value, str):
            text[name] = raw_value
        else:
            raise EnvelopeError(f"{name}: must be a string, got {type(raw_value).__name__}")
    return text


def _check_event(value: object) -> str:
    """An event name clients may be sent: not socket.io's own, not the gateway's."""
    try:
        return check_event_name(value)
    except EventNameError as exc:
        raise EnvelopeError(f"event: {exc}") from None


def _check_text(name: str, value: object, max_length: int) -> str:
    if not isinstance(value, str):
        raise EnvelopeError(f"{name}: must be a string, got {type(value).__name__}")
    if not value:
        raise EnvelopeError(f"{name}: must not be empty")
    if len(value) > max_length:
        raise EnvelopeError(f"{name}: longer than {max_length} characters: {_show(value)}")
    return value


def _optional(text: Mapping[str, str], name: str, max_length: int) -> str | None:
    value = text.get(name)
    return None if value is None else _check_text(name, value, max_length)


def _check_traceparent(value: object) -> None:
    if not isinstance(value, str) or _TRACEPARENT_RE.match(value) is None:
        raise EnvelopeError(f"traceparent: not a w3c traceparent: {_show(value)}")


def check_traceparent(value: object) -> str:
    """Return ``value`` if it is a W3C ``traceparent``; raise :class:`EnvelopeError` if not."""
    _check_traceparent(value)
    assert isinstance(value, str)
    return value
