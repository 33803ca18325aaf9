"""The server API across instances: requests over the broker's control channel.

A request (``{"t": "req", "id", "from", "op", "sel", "args"}``, msgpack) goes to every instance,
this one included; each carries it out on its own sockets and answers the requester alone
(``{"t": "rep", "id", "instance", "result"}``).  The requester waits for the instances that were
live when it asked (the broker's registry), until the timeout; those that did not answer are
reported.  What a caller gets:

* each instance acts on the sockets it has when the request arrives: a socket that connects
  (or moves) while the request is on its way may be missed or reached;
* an instance that is down, or cut from the broker, answers nothing: it is named in
  ``missing_instances``; an instance that stopped more than a few seconds ago is not expected;
* an answer that arrives after the timeout is dropped (counted).

Operations: ``emit`` and ``emit_ack`` (send an event, collect acks), ``fetch``, ``count``,
``join``, ``leave`` and ``disconnect``.  The operations themselves are in
:class:`roomcast.operator.BroadcastOperator`.  A component may add operations of its own
(:meth:`Cluster.add_operation`) and messages of other kinds (:meth:`Cluster.on_kind`, sent with
:meth:`Cluster.send`): the Admin UI (:mod:`roomcast.admin`) does.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import orjson

from roomcast.broker.base import Broker, BrokerError, PublishRequest, PublishResult
from roomcast.metrics import Metrics
from roomcast.operator import MAX_ACK_TIMEOUT_S, Reach, Selector, SelectorError
from roomcast.revocation import TokenRevokedError, jti_entry, now_ms, user_entry
from roomcast.schemas import EventSchemas, payload_of
from roomcast.socket import Socket
from roomcast.sockets import SocketServer
from roomcast.tasks import TaskSet
from roomcast.types import SocketId

__all__ = ["Cluster"]

log = logging.getLogger("roomcast.cluster")

OPERATIONS = frozenset(
    {"emit", "emit_ack", "fetch", "count", "join", "leave", "disconnect", "revoke"}
)

Operation = Callable[[Selector, dict[str, Any]], Awaitable[dict[str, Any]]]
"""An added operation: ``(selector, args) -> result`` on the answering instance."""
MessageHandler = Callable[[dict[str, Any]], None]
"""Takes a decoded control message of an added kind."""


class _Pending:
    __slots__ = ("done", "expected", "failed", "results")

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.results: dict[str, dict[str, Any]] = {}
        self.failed: set[str] = set()
        """Instances that answered they could not carry the request out (reported missing)."""
        self.done = asyncio.Event()

    def settle(self) -> None:
        if self.expected <= self.results.keys() | self.failed:
            self.done.set()


def encode_control(message: dict[str, Any]) -> bytes:
    """A control message in msgpack: bytes anywhere in it (a binary emit, a binary ack)
    travel as themselves, and no JSON value of a user's can be mistaken for them."""
    return msgpack.packb(message, use_bin_type=True, default=_as_json)  # type: ignore[no-any-return]


def _as_json(value: object) -> Any:
    """What msgpack cannot hold (a datetime, a UUID, a dataclass) as the JSON orjson makes of
    it, as a client would get it from ``socket.emit``."""
    return orjson.loads(orjson.dumps(value))


def decode_control(message: bytes) -> Any:
    return msgpack.unpackb(message, raw=False, strict_map_key=False)


class Cluster:
    """Sends the server API's requests, and answers those of every instance (this one too)."""

    def __init__(
        self,
        broker: Broker,
        sockets: SocketServer,
        metrics: Metrics,
        tasks: TaskSet,
        *,
        answer_timeout_s: float = 2.0,
        revocation_ttl_s: int = 86_400,
        publish: Callable[[PublishRequest], Awaitable[PublishResult]] | None = None,
        schemas: EventSchemas | None = None,
    ) -> None:
        """``publish`` is the node's (event schemas, tracing); the broker's by default."""
        self._publish = publish or broker.publish
        self._schemas = schemas
        self._broker = broker
        self._sockets = sockets
        self._metrics = metrics
        self._tasks = tasks
        self._answer_timeout_s = answer_timeout_s
        self._revocation_ttl_s = revocation_ttl_s
        self._pending: dict[str, _Pending] = {}
        self._operations: dict[str, Operation] = {}
        self._kinds: dict[str, MessageHandler] = {}

    def add_operation(self, op: str, run: Operation) -> None:
        """Answer requests ``op`` (a name of the caller's, not one of :data:`OPERATIONS`) with
        ``run``, which raises ``ValueError`` or ``TypeError`` for a request it cannot take."""
        if op in OPERATIONS or op in self._operations:
            raise ValueError(f"op: {op!r} is taken")
        self._operations[op] = run

    def on_kind(self, kind: str, handler: MessageHandler) -> None:
        """Hand control messages ``{"t": kind, ...}`` to ``handler``."""
        if kind in ("req", "rep") or kind in self._kinds:
            raise ValueError(f"kind: {kind!r} is taken")
        self._kinds[kind] = handler

    async def send(self, body: dict[str, Any], instance: str | None) -> None:
        """Send a control message of an added kind to ``instance`` (``None``: every one);
        at most once, like every control message.  Raise :class:`BrokerError` if it could
        not be sent."""
        await self._broker.send_control(encode_control(body), instance)

    @property
    def answer_timeout_s(self) -> float:
        return self._answer_timeout_s

    def check_payload(self, event: str, args: tuple[Any, ...]) -> None:
        if self._schemas is not None:
            self._schemas.check(event, payload_of(list(args)))

    @property
    def instance(self) -> str:
        return self._broker.instance_id

    # -- requester ----------------------------------------------------------------------------
    async def publish(self, request: PublishRequest) -> PublishResult:
        result = await self._publish(request)
        self._metrics.published.labels("server_api").inc()
        return result

    async def request(
        self, op: str, selector: Selector, args: dict[str, Any], timeout_s: float
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Run ``op`` on every live instance; raise :class:`BrokerError` if the request
        could not be sent at all."""
        if op not in OPERATIONS and op not in self._operations:
            raise ValueError(f"op: unknown operation {op!r}")
        if not 0 < timeout_s <= MAX_ACK_TIMEOUT_S + self._answer_timeout_s:
            raise ValueError(f"timeout: must be in (0, {MAX_ACK_TIMEOUT_S}] seconds")
        expected = set(await self._broker.instances())
        expected.add(self.instance)  # even before its first announcement
        request_id = uuid.uuid4().hex
        pending = self._pending[request_id] = _Pending(expected)
        message = {
            "t": "req",
            "id": request_id,
            "from": self.instance,
            "op": op,
            "sel": selector.to_json(),
            "args": args,
        }
        try:
            await self._broker.send_control(encode_control(message))
            try:
                async with asyncio.timeout(timeout_s):
                    await pending.done.wait()
            except TimeoutError:
                pass
        finally:
            del self._pending[request_id]
        missing = sorted(pending.expected - pending.results.keys())
        if missing:
            self._metrics.cluster_requests.labels(op, "incomplete").inc()
            log.warning("%s: no answer from instances %s within %.1fs", op, missing, timeout_s)
        else:
            self._metrics.cluster_requests.labels(op, "complete").inc()
        return list(pending.results.values()), missing

    # -- both sides ---------------------------------------------------------------------------
    def on_message(self, message: bytes) -> None:
        """A control message from the broker (a request to answer, or an answer)."""
        try:
            body = decode_control(message)
            kind = body["t"]
        except (ValueError, msgpack.UnpackException, KeyError, TypeError) as exc:
            self._dropped("bad_control_message", f"{exc!r}")
            return
        if kind == "rep":
            self._on_answer(body)
        elif kind == "req":
            self._tasks.spawn(self._answer(body), name=f"cluster-{str(body.get('op'))[:20]}")
        elif (handler := self._kinds.get(kind) if isinstance(kind, str) else None) is not None:
            try:
                handler(body)
            except Exception:
                log.exception("control message of kind %r failed", kind)
                self._dropped("control_handler_failed", f"kind {kind!r}")
        else:
            self._dropped("bad_control_message", f"kind {str(kind)[:20]!r}")

    def _on_answer(self, body: dict[str, Any]) -> None:
        pending = self._pending.get(str(body.get("id")))
        instance = body.get("instance")
        if pending is None or not isinstance(instance, str):
            self._dropped("late_control_answer", f"answer to {str(body.get('id'))[:40]}")
            return
        result = body.get("result")
        if "error" in body or not isinstance(result, dict):
            log.warning("instance %s could not answer: %s", instance, body.get("error"))
            pending.failed.add(instance)  # reported missing, without waiting for it
        else:
            pending.results[instance] = result
        pending.settle()

    def _dropped(self, reason: str, detail: str) -> None:
        self._metrics.dropped.labels(reason).inc()
        log.info("dropped control message (%s): %s", reason, detail)

    # -- answering ----------------------------------------------------------------------------
    async def _answer(self, body: dict[str, Any]) -> None:
        requester, request_id, op = body.get("from"), body.get("id"), body.get("op")
        if not isinstance(requester, str) or not isinstance(request_id, str):
            self._dropped("bad_control_message", "request without id or requester")
            return
        answer: dict[str, Any] = {"t": "rep", "id": request_id, "instance": self.instance}
        try:
            if op not in OPERATIONS and op not in self._operations:
                raise SelectorError(f"op: unknown operation {str(op)[:40]!r}")
            selector = Selector.from_json(body.get("sel"))
            args = body.get("args")
            answer["result"] = await self._run(
                str(op), selector, args if isinstance(args, dict) else {}
            )
        except (SelectorError, ValueError, TypeError) as exc:  # a request this one can't take
            self._dropped("bad_control_request", f"{op} for {requester}: {exc}")
            answer["error"] = str(exc)
        try:
            encoded = encode_control(answer)
        except TypeError as exc:  # a value no control message can carry
            self._dropped("bad_control_answer", f"{op} for {requester}: {exc}")
            encoded = encode_control({**answer, "result": None, "error": str(exc)})
        try:
            await self._broker.send_control(encoded, requester)
        except BrokerError as exc:
            self._dropped("control_answer_unsent", f"{op} for {requester}: {exc}")

    def matching(self, selector: Selector) -> list[Socket]:
        """The local sockets ``selector`` reaches."""
        server = self._sockets
        rooms, excluded = selector.rooms, selector.except_rooms
        if selector.socket is not None:
            found = server.sockets.get(SocketId(selector.socket))
            candidates: list[Socket] = [found] if found is not None else []
        elif rooms:
            seen: dict[str, Socket] = {}
            for room in rooms:
                for member in server.hub.rooms.get((selector.namespace, room), {}):
                    socket = server.sockets.get(SocketId(member.id))
                    if socket is not None:
                        seen[socket.id] = socket
            candidates = list(seen.values())
        else:
            candidates = list(server.sockets.values())
        return [
            socket
            for socket in candidates
            if socket.connected
            and socket.namespace.name == selector.namespace
            and (not rooms or socket.rooms & rooms)
            and (selector.user is None or socket.user_id == selector.user)
            and (not excluded or (socket.id not in excluded and not socket.rooms & excluded))
        ]

    async def _run(self, op: str, selector: Selector, args: dict[str, Any]) -> dict[str, Any]:
        added = self._operations.get(op)
        if added is not None:
            return await added(selector, args)
        sockets = self.matching(selector)
        if op == "fetch":
            return {"sockets": [self._describe(socket) for socket in sockets]}
        if op == "count":
            return {"sockets": len(sockets), "users": sorted({s.user_id for s in sockets})}
        if op in ("join", "leave"):
            rooms = Selector.from_json({"rooms": args.get("rooms", [])}).rooms
            for socket in sockets:
                for room in rooms:
                    if op == "join":
                        socket.join(room)
                    else:
                        socket.leave(room)
            return {"sockets": len(sockets)}
        if op == "revoke":
            return {"sockets": self.apply_revocation(str(args.get("entry", "")))}
        if op == "disconnect":
            reason = str(args.get("reason", ""))[:200]
            close = args.get("close") is True
            for socket in sockets:
                self._metrics.disconnects.labels("server_disconnect").inc()
                socket.emit("roomcast:disconnect", {"code": "server_disconnect", "message": reason})
                socket.disconnect()
                if close:  # the whole connection, with its other namespaces
                    socket.conn.close(f"server disconnect: {reason}")
            return {"sockets": len(sockets)}
        event, event_args = str(args.get("event", "")), args.get("args", [])
        if not isinstance(event_args, list):
            raise TypeError("args: must be a list")
        if op == "emit":
            for socket in sockets:
                socket.emit(event, *event_args)
            return {"sockets": len(sockets)}
        timeout_s = args.get("timeout_s")
        if (
            not isinstance(timeout_s, int | float)
            or isinstance(timeout_s, bool)
            or not 0 < timeout_s <= MAX_ACK_TIMEOUT_S
        ):
            raise ValueError(f"timeout_s: must be a number in (0, {MAX_ACK_TIMEOUT_S}]")
        return await self._gather_acks(sockets, event, event_args, float(timeout_s))

    async def _gather_acks(
        self, sockets: list[Socket], event: str, args: list[Any], timeout_s: float
    ) -> dict[str, Any]:
        async def ask(socket: Socket) -> tuple[str, list[Any] | None]:
            try:
                return socket.id, await socket.call(event, *args, ack_timeout_s=timeout_s)
            except TimeoutError:
                return socket.id, None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task is cancelled, not just the socket's ack
                return socket.id, None  # the socket disconnected before it answered

        answers = await asyncio.gather(*(ask(socket) for socket in sockets))
        return {
            "acks": [
                [sid, (data[0] if data else None)] for sid, data in answers if data is not None
            ],
            "missing": [sid for sid, data in answers if data is None],
        }

    # -- revocation -----------------------------------------------------------------------------
    async def revoke(
        self, *, user: str | None = None, jti: str | None = None, exp: float | None = None
    ) -> Reach:
        """Revoke every token of ``user`` issued until now, or the token ``jti`` (until its
        ``exp``, Unix seconds): stored in the broker, then every instance disconnects the
        matching sockets with ``token_revoked``."""
        now = now_ms()
        if user is not None:
            entry = user_entry(user, now)
            until = now + self._revocation_ttl_s * 1000
        elif jti is not None and exp is not None:
            # Kept a minute past exp: a token is refused until then even by a clock behind.
            entry, until = jti_entry(jti), max(int(exp * 1000), now) + 60_000
        else:
            raise ValueError("revoke: give a user, or a jti with its exp")
        await self._broker.revoke(entry, until)
        self._sockets.revocations.learn(entry)
        results, missing = await self.request(
            "revoke", Selector(), {"entry": entry}, self._answer_timeout_s
        )
        return Reach(sum(int(r.get("sockets", 0)) for r in results), missing)

    def apply_revocation(self, entry: str) -> int:
        """Know of ``entry``, and disconnect the local sockets it revokes."""
        server = self._sockets
        server.revocations.learn(entry)
        return self.kick_revoked()

    def kick_revoked(self) -> int:
        """Disconnect every local socket whose token is revoked; return how many."""
        server = self._sockets
        revoked: list[Socket] = []
        for socket in server.sockets.values():
            try:
                server.revocations.check(socket.principal)
            except TokenRevokedError:
                revoked.append(socket)
        for socket in revoked:
            socket.kick("token_revoked", "token revoked")
        return len(revoked)

    def _describe(self, socket: Socket) -> dict[str, Any]:
        return {
            "id": socket.id,
            "namespace": socket.namespace.name,
            "user": socket.user_id,
            "rooms": sorted(socket.rooms),
            "instance": self.instance,
            "transport": "websocket" if socket.conn.ws is not None else "polling",
            "connected_at": socket.since,
        }
