"""The built-in events of every namespace: ``join``, ``leave``, ``publish`` and ``refresh``.

Rooms are authorized by the token's ``rooms`` / ``publish`` claims.  The node hands
:data:`BUILTINS` to the socket server, which looks an event up there when no handler of the
application takes it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from roomcast.auth import AuthError, InvalidRoomError, validate_room
from roomcast.broker.base import BrokerError, BrokerUnavailableError, PublishRequest
from roomcast.broker.envelope import ATTACHMENT_FIELD, EnvelopeError, encode_data
from roomcast.broker.topics import topic
from roomcast.http.errors import ACK_OK, ack_error
from roomcast.protocol.errors import EventNameError
from roomcast.protocol.socketio import check_event_name
from roomcast.schemas import payload_of
from roomcast.socket import BuiltinEvent, Socket

log = logging.getLogger("roomcast.sockets")


def _room_arg(socket: Socket, args: list[Any], ack_id: int | None) -> str | None:
    try:
        return validate_room(args[0] if args else None)
    except InvalidRoomError as error:
        if ack_id is not None:
            socket.ack(ack_id, ack_error("invalid_room", str(error)))
        return None


def _join(socket: Socket, args: list[Any], ack_id: int | None) -> None:
    bucket = socket.joins_bucket
    if bucket is not None and not bucket.take():
        socket.rate_limited(bucket, "joins", ack_id)
        return
    _join_counted(socket, args, ack_id)


def _join_counted(socket: Socket, args: list[Any], ack_id: int | None) -> None:
    room = _room_arg(socket, args, ack_id)
    if room is None:
        return
    if not socket.principal.may_join(room):
        if ack_id is not None:
            socket.ack(ack_id, ack_error("forbidden", f"not allowed to join {room!r}"))
        return
    limit = socket.client.server.options.max_rooms
    if room not in socket.rooms and len(socket.rooms) >= limit:
        socket.client.server.metrics.refused_events.labels("too_many_rooms").inc()
        socket.client.server.refusals.refused("rooms", f"socket {socket.id} in {limit} rooms")
        if ack_id is not None:
            socket.ack(ack_id, ack_error("too_many_rooms", f"a socket may be in {limit} rooms"))
        return
    handoff = socket.client.server.handoff
    if handoff is not None and handoff.offer(socket, room, ack_id):
        return  # the worker that owns the room (or, failing that, this one) answers later
    join_here(socket, room, ack_id)


def join_event(socket: Socket, room: str, ack_id: int | None) -> None:
    """The client's ``join`` event, as if just received (a session that moved here with it;
    its join rate was counted where it came from)."""
    _join_counted(socket, [room], ack_id)


def join_here(socket: Socket, room: str, ack_id: int | None) -> None:
    """Join an authorized room on this worker; ack once the broker delivers the room."""
    socket.join(room)
    if ack_id is None:
        return
    subscriptions = socket.client.server.subscriptions
    if subscriptions.is_active(topic(socket.namespace.name, room)):
        socket.ack(ack_id, ACK_OK)
    else:
        socket.answer_later(_ack_when_subscribed(socket, room, ack_id), "join")


async def _ack_when_subscribed(socket: Socket, room: str, ack_id: int) -> None:
    """Answer a join once the broker delivers the room, so no later publish is missed; if the
    broker refuses the room, the socket leaves it again and the ack says why."""
    server = socket.client.server
    try:
        await server.subscriptions.wait(topic(socket.namespace.name, room))
    except BrokerError as exc:
        socket.leave(room)
        server.metrics.refused_events.labels("room_unavailable").inc()
        log.warning(
            "join of %r refused by the broker: %s",
            room,
            exc,
            extra={"socket": socket.id, "user": socket.user_id, "room": room},
        )
        socket.ack(ack_id, ack_error("room_unavailable", "the broker cannot deliver this room"))
        return
    socket.ack(ack_id, ACK_OK)


def _leave(socket: Socket, args: list[Any], ack_id: int | None) -> None:
    room = _room_arg(socket, args, ack_id)
    if room is None:
        return
    socket.leave(room)
    if ack_id is not None:
        socket.ack(ack_id, ACK_OK)


def _publish(socket: Socket, args: list[Any], ack_id: int | None) -> None:
    body = args[0] if args else None
    event = body.get("event") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(event, str) or "data" not in body:
        if ack_id is not None:
            socket.ack(
                ack_id,
                ack_error("invalid_publish", "expected {room, event, data} with a string event"),
            )
        return
    try:
        check_event_name(event)
    except EventNameError as exc:
        if ack_id is not None:
            socket.ack(ack_id, ack_error("invalid_event", str(exc)))
        return
    room = _room_arg(socket, [body.get("room")], ack_id)
    if room is None:
        return
    if not socket.principal.may_publish(room):
        if ack_id is not None:
            socket.ack(ack_id, ack_error("forbidden", f"not allowed to publish to {room!r}"))
        return
    schema = socket.client.server.options.event_schemas.get(event)
    if schema is not None and socket.refused(event, body["data"], schema, ack_id, "client_publish"):
        return
    request = PublishRequest(
        room=room,
        namespace=socket.namespace.name,
        event=body["event"],
        data=body["data"],
        exclude_sid=socket.id,
    )
    socket.answer_later(_do_publish(socket, request, ack_id), "client-publish")


async def _do_publish(socket: Socket, request: PublishRequest, ack_id: int | None) -> None:
    server = socket.client.server
    try:
        result = await server.broker.publish(request)
    except EnvelopeError as exc:  # data no stream entry can hold (a placeholder beside bytes)
        what = f"client publish to {request.room}: {exc}"
        _refused(socket, ack_id, "invalid_payload", what, "invalid_payload", str(exc))
        return
    except BrokerUnavailableError as exc:
        what = f"client publish to {request.room}: {exc}"
        message = "broker unavailable, retry"
        _refused(socket, ack_id, "broker_unavailable", what, "unavailable", message)
        return
    except BrokerError as exc:  # refused by the broker itself: a retry would not help
        what = f"client publish to {request.room}: {exc}"
        message = "the broker refused the publication"
        _refused(socket, ack_id, "broker_refused", what, "broker_refused", message)
        return
    server.metrics.published.labels("client").inc()
    if ack_id is not None:
        socket.ack(ack_id, {"ok": True, "id": result.id})


def _refresh(socket: Socket, args: list[Any], ack_id: int | None) -> None:
    body = args[0] if args else None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        if ack_id is not None:
            socket.ack(ack_id, ack_error("invalid_refresh", "expected {token: <a fresh jwt>}"))
        return
    if socket.client.server.auth is None:
        if ack_id is not None:
            socket.ack(ack_id, ack_error("auth_disabled", "this gateway checks no tokens"))
        return
    socket.answer_later(_do_refresh(socket, token, ack_id), "refresh")


async def _do_refresh(socket: Socket, token: str, ack_id: int | None) -> None:
    """Verify a fresh token for the same user; on success the socket takes its claims and
    leaves the rooms they no longer allow; on failure it keeps its old token."""
    server = socket.client.server
    assert server.auth is not None  # checked by _refresh
    try:
        principal = await server.auth.authenticate(token)
        server.revocations.check(principal)
        if principal.user_id != socket.user_id:
            raise TokenUserError(
                f"the token is for user {principal.user_id[:40]!r}, not {socket.user_id[:40]!r}"
            )
    except AuthError as error:
        server.metrics.refreshes.labels(error.code).inc()
        log.info(
            "refresh refused on %s: %s",
            socket.id,
            error,
            extra={"socket": socket.id, "user": socket.user_id, "reason": error.code},
        )
        if ack_id is not None:
            socket.ack(ack_id, ack_error(error.code, str(error)))
        return
    if not socket.connected:
        return
    left = socket.refresh(principal)
    server.metrics.refreshes.labels("ok").inc()
    if ack_id is not None:
        socket.ack(ack_id, {"ok": True, "left": left})


class TokenUserError(AuthError):
    """A refresh token for another user than the socket's."""

    code: ClassVar[str] = "user_mismatch"


def upstream_event(name: str) -> BuiltinEvent:
    """The built-in of a configured upstream event ``name``: checked against its schema, then
    appended to the upstream stream for backend services; the ack carries the entry id."""

    def upstream(socket: Socket, args: list[Any], ack_id: int | None) -> None:
        schema = socket.client.server.options.event_schemas.get(name)
        if schema is not None and socket.refused(name, payload_of(args), schema, ack_id):
            return
        socket.answer_later(_append_upstream(socket, name, args, ack_id), f"upstream-{socket.id}")

    return upstream


async def _append_upstream(socket: Socket, name: str, args: list[Any], ack_id: int | None) -> None:
    server = socket.client.server
    try:
        data, attachments = encode_data(args[0] if len(args) == 1 else args)
    except EnvelopeError as exc:  # e.g. more bytes values than an entry may hold
        server.drop("upstream_refused", f"event {name!r} from {socket.id}: {exc}")
        if ack_id is not None:
            socket.ack(ack_id, ack_error("invalid_payload", str(exc)))
        return
    fields: dict[str, str | bytes] = {
        "event": name,
        "data": data,
        "user_id": socket.user_id,
        "sid": socket.id,
        "ts": str(int(time.time() * 1000)),
    }
    if attachments:  # binary: placeholders in data, the bytes beside it (as in rooms)
        fields["attachments"] = str(len(attachments))
        for num, attachment in enumerate(attachments):
            fields[ATTACHMENT_FIELD.format(num)] = attachment
    if socket.namespace.name != "/":
        fields["namespace"] = socket.namespace.name
    tracing = server.tracing
    try:
        if tracing is None:
            entry_id = await server.broker.append_upstream(fields)
        else:
            entry_id = await tracing.upstream(
                server.broker.append_upstream,
                fields,
                socket=socket.id,
                user=socket.user_id,
                instance=server.broker.instance_id,
            )
    except BrokerUnavailableError as exc:
        what = f"event {name!r} from {socket.id}: {exc}"
        message = "upstream stream unavailable, retry"
        _refused(socket, ack_id, "upstream_unavailable", what, "unavailable", message)
        return
    except BrokerError as exc:  # refused by the broker itself: a retry would not help
        what = f"event {name!r} from {socket.id}: {exc}"
        message = "the broker refused the event"
        _refused(socket, ack_id, "upstream_refused", what, "broker_refused", message)
        return
    if ack_id is not None:
        socket.ack(ack_id, {"ok": True, "id": entry_id})


def _refused(
    socket: Socket, ack_id: int | None, reason: str, detail: str, code: str, message: str
) -> None:
    """A client's event the broker did not take: counted and logged as a drop (``reason``),
    and answered with ``code`` when the client asked for an ack."""
    socket.client.server.drop(reason, detail)
    if ack_id is not None:
        socket.ack(ack_id, ack_error(code, message))


BUILTINS: dict[Any, BuiltinEvent] = {
    "join": _join,
    "leave": _leave,
    "publish": _publish,
    "refresh": _refresh,
}
