"""``roomcast asyncapi``: the gateway's events as an AsyncAPI 3.0 document.

The document describes the gateway (the application): a ``receive`` operation for every event
a client may emit, with the ack it gets as the operation's reply, and a ``send`` operation for
every event the gateway emits. Each Socket.IO namespace is a channel whose address is the
namespace. What it lists comes from the same settings and app a ``serve`` would use:

- client to server: the built-ins ``join``, ``leave``, ``publish`` and ``refresh`` with their
  acks, the ``--upstream-events`` (payload: their schema from ``--event-schemas``, else any
  JSON) with theirs, and the app's handlers (payload: their ``schema=``, else any JSON);
- server to client: every event of ``--event-schemas`` (what a publication of it carries),
  any other publication, and ``roomcast:disconnect``.

The message name is the Socket.IO event name; the payload is the event's one argument (an
event emitted with several arguments is checked, and described, as their array); a reply is
the ack's one argument. Event schemas are JSON Schema draft-07, which AsyncAPI's default
schema format extends; their local ``$ref``s are rewritten to where they now live.
"""

from __future__ import annotations

import copy
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from roomcast.app import Application
from roomcast.auth import ROOM_NAME_MAX_LENGTH
from roomcast.config import Settings
from roomcast.schemas import EventSchema, EventSchemas

__all__ = ["document"]

ASYNCAPI_VERSION: Final = "3.0.0"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_DATA_KEYWORDS: Final = frozenset({"const", "enum", "default", "examples"})
"""Schema keywords whose values are data: a ``$ref`` in them is not a reference."""
_ERROR: Final = ("components", "schemas", "AckError")

_ACK_ERROR_CODES: Final = (
    "invalid_room",
    "forbidden",
    "too_many_rooms",
    "room_unavailable",
    "invalid_publish",
    "invalid_event",
    "invalid_payload",
    "unavailable",
    "broker_refused",
    "unknown_event",
    "bad_arguments",
    "internal_error",
    "invalid_refresh",
    "auth_disabled",
    "token_missing",
    "token_invalid",
    "token_expired",
    "token_revoked",
    "user_mismatch",
)


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)}


def _components_schemas() -> dict[str, Any]:
    error = {
        "type": "object",
        "required": ["ok", "error"],
        "properties": {
            "ok": {"const": False},
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": list(_ACK_ERROR_CODES)},
                    "message": {"type": "string"},
                    "details": {
                        "description": "with invalid_payload: where the payload fails its schema",
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["path", "message"],
                            "properties": {
                                "path": {
                                    "type": "string",
                                    "description": "JSON Pointer into the payload",
                                },
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    }
    stored = {
        "type": "object",
        "required": ["ok", "id"],
        "properties": {"ok": {"const": True}, "id": {"type": "string"}},
    }
    return {
        "RoomName": {
            "type": "string",
            "minLength": 1,
            "maxLength": ROOM_NAME_MAX_LENGTH,
            "pattern": "^[A-Za-z0-9:_.@/-]+$",
            "description": "a room; the token's rooms / publish claims decide which are allowed",
        },
        "AckError": error,
        "AckOk": {"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}},
        "RoomAck": {"oneOf": [_ref("components", "schemas", "AckOk"), _ref(*_ERROR)]},
        "StoredAck": {
            "oneOf": [stored, _ref(*_ERROR)],
            "description": "ok with the id of the stored entry, or an error",
        },
        "RefreshRequest": {
            "type": "object",
            "required": ["token"],
            "properties": {"token": {"type": "string", "description": "a fresh JWT"}},
        },
        "RefreshAck": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["ok", "left"],
                    "properties": {
                        "ok": {"const": True},
                        "left": {
                            "type": "array",
                            "items": _ref("components", "schemas", "RoomName"),
                            "description": "rooms the new claims no longer allow, now left",
                        },
                    },
                },
                _ref(*_ERROR),
            ],
            "description": "refused: the socket keeps its old token",
        },
        "PublishRequest": {
            "type": "object",
            "required": ["room", "event", "data"],
            "properties": {
                "room": _ref("components", "schemas", "RoomName"),
                "event": {"type": "string", "minLength": 1},
                "data": {"description": "checked against the event's schema, if it has one"},
            },
        },
        "Disconnect": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    }


def _embed(schema: object, where: tuple[str, ...]) -> object:
    """``schema`` as it can live at ``where`` in the document: local ``$ref``s made absolute,
    and no ``$schema`` / ``$id`` (the document decides the dialect and the base)."""
    prefix = _ref(*where)["$ref"]

    def walk(value: object, data: bool) -> object:
        if isinstance(value, list):
            return [walk(item, data) for item in value]
        if not isinstance(value, dict):
            return value
        if data:
            return copy.deepcopy(value)
        out: dict[str, object] = {}
        for key, item in value.items():
            if key in ("$schema", "$id"):
                continue
            if key == "$ref" and isinstance(item, str) and item.startswith("#"):
                out[key] = prefix + item[1:]
            else:
                out[key] = walk(item, key in _DATA_KEYWORDS)
        return out

    if isinstance(schema, bool):  # AsyncAPI wants an object where JSON Schema takes a boolean
        return {} if schema else {"not": {}}
    return walk(schema, False)


class _Builder:
    def __init__(self) -> None:
        self.schemas = _components_schemas()
        self.messages: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self._keys: set[str] = set()
        self._embedded: dict[int, dict[str, str]] = {}

    def key(self, *parts: str) -> str:
        """A component key (``[A-Za-z0-9_-]``) for ``parts``, unique in this document."""
        base = "_".join(_KEY_UNSAFE.sub("_", p).strip("_") or "x" for p in parts)
        key, n = base, 1
        while key in self._keys:
            n += 1
            key = f"{base}_{n}"
        self._keys.add(key)
        return key

    def event_schema(self, schema: EventSchema) -> dict[str, str]:
        """A reference to ``schema`` in the components (added there once)."""
        ref = self._embedded.get(id(schema))
        if ref is None:
            key = self.key("event", schema.event)
            self.schemas[key] = _embed(schema.schema, ("components", "schemas", key))
            ref = self._embedded[id(schema)] = _ref("components", "schemas", key)
        return ref

    def message(self, key: str, **fields: Any) -> str:
        self._keys.add(key)
        self.messages[key] = {"contentType": "application/json", **fields}
        return key

    def channel(self, namespace: str) -> str:
        key = self.key("namespace", "main" if namespace == "/" else namespace)
        self.channels[key] = {
            "address": namespace,
            "title": f"namespace {namespace}",
            "description": f"The Socket.IO namespace {namespace!r}.",
            "messages": {},
        }
        return key

    def operation(
        self,
        channel: str,
        action: str,
        message: str,
        *,
        reply: str | None = None,
        summary: str,
    ) -> None:
        messages = self.channels[channel]["messages"]
        messages[message] = _ref("components", "messages", message)
        operation: dict[str, Any] = {
            "action": action,
            "channel": _ref("channels", channel),
            "summary": summary,
            "messages": [_ref("channels", channel, "messages", message)],
        }
        if reply is not None:
            messages[reply] = _ref("components", "messages", reply)
            operation["reply"] = {
                "channel": _ref("channels", channel),
                "messages": [_ref("channels", channel, "messages", reply)],
            }
        self.operations[self.key(channel, action, message)] = operation


def _version() -> str:
    try:
        return version("roomcast")
    except PackageNotFoundError:
        return "0.0.0"


def document(
    settings: Settings, app: Application | None = None, schemas: EventSchemas | None = None
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of a gateway run with ``settings``, ``app`` and ``schemas``."""
    app = app or Application()
    schemas = schemas if schemas is not None else EventSchemas()
    b = _Builder()
    room = _ref("components", "schemas", "RoomName")
    room_ack = _ref("components", "schemas", "RoomAck")
    stored_ack = _ref("components", "schemas", "StoredAck")

    b.message("join", name="join", title="join a room", payload=room)
    b.message("leave", name="leave", title="leave a room", payload=room)
    b.message(
        "publish",
        name="publish",
        title="publish to a room",
        summary="needs the token's publish claim; members other than the sender receive it",
        payload=_ref("components", "schemas", "PublishRequest"),
    )
    b.message(
        "refresh",
        name="refresh",
        title="hand over a fresh token",
        summary="same user; the socket keeps its id and rooms, and leaves those the new claims "
        "do not allow",
        payload=_ref("components", "schemas", "RefreshRequest"),
    )
    b.message("roomAck", title="ack of join / leave", payload=room_ack)
    b.message(
        "refreshAck", title="ack of refresh", payload=_ref("components", "schemas", "RefreshAck")
    )
    b.message("storedAck", title="ack of a stored event", payload=stored_ack)
    b.message(
        "handlerAck",
        title="ack of an app handler",
        summary="what the handler returned, or an error ack (invalid_payload, bad_arguments, "
        "internal_error)",
        payload={},
    )
    b.message(
        "disconnect",
        name="roomcast:disconnect",
        title="the gateway ends the socket",
        summary="sent before a server disconnect: code token_expired, token_revoked, ...",
        payload=_ref("components", "schemas", "Disconnect"),
    )
    b.message(
        "publication",
        title="any other publication",
        summary="an event a service published to a room the socket is in: the message name "
        "is the publication's event, the payload its data",
        payload={},
    )
    published: list[str] = []
    for event, schema in schemas.items():
        key = b.key("published", event)
        b.message(
            key,
            name=event,
            title=f"publication of {event!r}",
            summary="checked against this schema on every publish path",
            payload=b.event_schema(schema),
        )
        published.append(key)
    upstream: list[tuple[str, str]] = []
    for event in settings.upstream_events:
        key = b.key("upstream", event)
        schema = schemas.get(event)
        b.message(
            key,
            name=event,
            title=f"{event!r} to the upstream stream",
            summary="appended to the upstream stream with the user id and socket id",
            payload=b.event_schema(schema) if schema is not None else {},
        )
        upstream.append((event, key))

    namespaces = ["/", *sorted(n for n in app.namespaces if n != "/")]
    for namespace in namespaces:
        channel = b.channel(namespace)
        handlers = app.namespaces[namespace].events if namespace in app.namespaces else {}
        b.operation(channel, "receive", "join", reply="roomAck", summary="join a room")
        b.operation(channel, "receive", "leave", reply="roomAck", summary="leave a room")
        b.operation(channel, "receive", "publish", reply="storedAck", summary="publish")
        b.operation(channel, "receive", "refresh", reply="refreshAck", summary="refresh")
        for event, key in upstream:
            if event not in handlers:
                b.operation(
                    channel, "receive", key, reply="storedAck", summary=f"upstream {event!r}"
                )
        for event, registered in sorted(handlers.items()):
            key = b.key("handler", "main" if namespace == "/" else namespace, event)
            payload = b.event_schema(registered.schema) if registered.schema is not None else {}
            if registered.schema is None and event in schemas:
                payload = b.event_schema(schemas[event])
            b.message(key, name=event, title=f"{event!r} to an app handler", payload=payload)
            b.operation(
                channel, "receive", key, reply="handlerAck", summary=f"app handler {event!r}"
            )
        for key in [*published, "publication", "disconnect"]:
            b.operation(channel, "send", key, summary=b.messages[key]["title"])

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Roomcast gateway",
            "version": _version(),
            "description": (
                "Socket.IO v5 events of a Roomcast gateway. Each message is one Socket.IO "
                "event: its name is the event name, its payload the event's one argument (an "
                "event with several arguments is their array). An operation with a reply is "
                "emitted with an ack callback, and the reply is the ack's one argument. "
                "Clients authenticate with a JWT (CONNECT auth payload {token})."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": f"{settings.host}:{settings.port}",
                "protocol": "ws",
                "pathname": "/socket.io/",
                "description": "Engine.IO v4: WebSocket, or HTTP long-polling upgraded to it",
                "security": [_ref("components", "securitySchemes", "jwt")],
            }
        },
        "channels": b.channels,
        "operations": b.operations,
        "components": {
            "schemas": b.schemas,
            "messages": b.messages,
            "securitySchemes": {
                "jwt": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "the CONNECT auth payload {token}, an Authorization: Bearer "
                    "header, or the token query parameter",
                }
            },
        },
    }
