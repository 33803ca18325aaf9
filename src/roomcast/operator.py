"""The server-side API in the shape Socket.IO users know: ``app.of(nsp).to(room).emit(...)``.

A :class:`BroadcastOperator` selects sockets (a namespace; rooms, socket ids to leave out, a user,
one socket) and acts on them on every instance:

* :meth:`~BroadcastOperator.emit` to exactly one room with one argument (and nothing left out)
  is a publication: it
  goes through the broker's stream of that room, so it is ordered with every other publication
  of the room and replayed to clients that recover.  Any other emit (several rooms, a whole
  namespace, rooms left out, zero or several arguments) is sent by every instance to its
  matching sockets, once per socket, like Socket.IO's Redis adapter: not replayed on recovery.
* :meth:`~BroadcastOperator.emit_with_ack`, :meth:`~BroadcastOperator.fetch_sockets`,
  :meth:`~BroadcastOperator.sockets_join`, :meth:`~BroadcastOperator.sockets_leave`,
  :meth:`~BroadcastOperator.disconnect_sockets` and :meth:`~BroadcastOperator.count` ask every
  live instance over the broker's control channel and gather the answers.  Each result says
  which instances did not answer in time (``missing_instances``).

The operator is a value: each selector method returns a new one.  What carries it out is the
node's :class:`ServerApi` (``roomcast.cluster.Cluster``), attached when the node starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from roomcast.auth import validate_room
from roomcast.broker.base import PublishRequest, PublishResult
from roomcast.broker.topics import MAIN, validate_namespace
from roomcast.protocol.socketio import check_event_name

__all__ = [
    "AckResult",
    "BroadcastOperator",
    "Reach",
    "RoomCount",
    "Selector",
    "SelectorError",
    "ServerApi",
    "SocketInfo",
    "SocketList",
]

DEFAULT_ACK_TIMEOUT_S = 5.0
MAX_ACK_TIMEOUT_S = 60.0


class SelectorError(ValueError):
    """A selector that names a bad namespace, room or socket id."""


@dataclass(frozen=True, slots=True)
class Selector:
    """Which sockets an operation reaches: those of ``namespace`` in any of ``rooms`` (every
    socket of the namespace when empty), except those in ``except_rooms`` (there a socket id
    counts as the room of that socket, as in Socket.IO), of ``user`` and with id ``socket``
    when set; every condition given must hold.  To reach one socket, use ``socket``: in
    ``rooms`` a socket id is just a room name."""

    namespace: str = MAIN
    rooms: frozenset[str] = frozenset()
    except_rooms: frozenset[str] = frozenset()
    user: str | None = None
    socket: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "nsp": self.namespace,
            "rooms": sorted(self.rooms),
            "except": sorted(self.except_rooms),
            "user": self.user,
            "socket": self.socket,
        }

    @classmethod
    def from_json(cls, value: object) -> Selector:
        """Parse :meth:`to_json`'s form; raise :class:`SelectorError` naming the bad field."""
        if not isinstance(value, dict):
            raise SelectorError("selector: must be an object")
        try:
            namespace = validate_namespace(value.get("nsp", MAIN))
        except ValueError as exc:
            raise SelectorError(f"namespace: {exc}") from None
        user, socket = value.get("user"), value.get("socket")
        if user is not None and (not isinstance(user, str) or not user):
            raise SelectorError("user: must be a non-empty string")
        if socket is not None and (not isinstance(socket, str) or not socket):
            raise SelectorError("socket: must be a non-empty string")
        return cls(
            namespace,
            _rooms("rooms", value.get("rooms", ())),
            _rooms("except", value.get("except", ())),
            user,
            socket,
        )


def _rooms(name: str, value: object) -> frozenset[str]:
    if not isinstance(value, list | tuple | frozenset | set):
        raise SelectorError(f"{name}: must be a list of rooms")
    try:
        return frozenset(validate_room(room) for room in value)
    except ValueError as exc:
        raise SelectorError(f"{name}: {exc}") from None


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """A socket as :meth:`BroadcastOperator.fetch_sockets` reports it."""

    id: str
    namespace: str
    user: str
    rooms: list[str]
    instance: str
    transport: str
    connected_at: float
    """Seconds since the Unix epoch."""

    @classmethod
    def from_json(cls, value: object) -> SocketInfo | None:
        """Parse one instance's description of a socket; ``None`` if it is not one."""
        if not isinstance(value, dict):
            return None
        try:
            rooms = value["rooms"]
            info = cls(
                id=str(value["id"]),
                namespace=str(value["namespace"]),
                user=str(value["user"]),
                rooms=[str(room) for room in rooms] if isinstance(rooms, list) else [],
                instance=str(value["instance"]),
                transport=str(value["transport"]),
                connected_at=float(value["connected_at"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return info

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "user": self.user,
            "rooms": self.rooms,
            "instance": self.instance,
            "transport": self.transport,
            "connected_at": self.connected_at,
        }


class SocketList(list[SocketInfo]):
    """The sockets found, and the instances that did not answer (their sockets are missing)."""

    def __init__(self, sockets: Iterable[SocketInfo], missing_instances: list[str]) -> None:
        super().__init__(sockets)
        self.missing_instances = missing_instances


@dataclass(frozen=True, slots=True)
class Reach:
    """How many sockets an action reached, and the instances that did not answer."""

    sockets: int
    missing_instances: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RoomCount:
    sockets: int
    users: int
    missing_instances: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AckResult:
    """The answers of every reached socket, in the order they came, and the sockets that did
    not answer within the timeout (on instances that did answer)."""

    acks: list[tuple[str, Any]]
    """``(socket id, response)``: the first argument the client's ack callback got."""
    missing: list[str]
    missing_instances: list[str] = field(default_factory=list)

    @property
    def responses(self) -> list[Any]:
        """The responses alone, as Socket.IO's ``emitWithAck`` resolves."""
        return [response for _, response in self.acks]


class ServerApi(Protocol):
    """What carries the operations out (``roomcast.cluster.Cluster``)."""

    async def publish(self, request: PublishRequest) -> PublishResult: ...

    async def request(
        self, op: str, selector: Selector, args: dict[str, Any], timeout_s: float
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Run ``op`` on every live instance; return their results and the instances that
        did not answer within ``timeout_s``."""
        ...

    @property
    def answer_timeout_s(self) -> float:
        """How long an instance may take to answer a request that waits for nothing else."""
        ...

    def check_payload(self, event: str, args: tuple[Any, ...]) -> None:
        """Raise ``roomcast.schemas.InvalidPayloadError`` if ``event`` has a schema that the
        arguments fail (the schemas of ``--event-schemas``)."""
        ...


class BroadcastOperator:
    """Selects sockets; each selector method returns a new operator."""

    __slots__ = ("_api", "_selector", "_timeout_s")

    def __init__(
        self,
        api: Callable[[], ServerApi],
        selector: Selector,
        timeout_s: float | None = None,
    ) -> None:
        self._api = api
        self._selector = selector
        self._timeout_s = timeout_s

    @property
    def selector(self) -> Selector:
        return self._selector

    def _with(self, **changes: Any) -> BroadcastOperator:
        return BroadcastOperator(self._api, replace(self._selector, **changes), self._timeout_s)

    def to(self, *rooms: str) -> BroadcastOperator:
        """Also the sockets in ``rooms`` (a union, as in Socket.IO)."""
        return self._with(rooms=self._selector.rooms | _rooms("rooms", rooms))

    in_ = to

    def except_(self, *rooms: str) -> BroadcastOperator:
        """Not the sockets in ``rooms``, nor the sockets with these ids."""
        return self._with(except_rooms=self._selector.except_rooms | _rooms("except", rooms))

    def user(self, user_id: str) -> BroadcastOperator:
        """Only the sockets of ``user_id``."""
        return self._with(user=user_id)

    def socket(self, sid: str) -> BroadcastOperator:
        """Only the socket with id ``sid``."""
        return self._with(socket=sid)

    def timeout(self, seconds: float) -> BroadcastOperator:
        """The time :meth:`emit_with_ack` waits for the clients' acks (at most a minute)."""
        if not 0 < seconds <= MAX_ACK_TIMEOUT_S:
            raise ValueError(f"timeout: must be in (0, {MAX_ACK_TIMEOUT_S}] seconds, got {seconds}")
        return BroadcastOperator(self._api, self._selector, seconds)

    # -- actions --------------------------------------------------------------------------------
    async def emit(self, event: str, *args: Any) -> Reach | PublishResult:
        """Send ``event`` to the selected sockets of every instance.

        To exactly one room with one argument (and no user, socket or room left out): a
        publication, returned as the broker's :class:`PublishResult`.  Otherwise every
        instance sends it, and the :class:`Reach` says to how many sockets."""
        check_event_name(event)
        sel = self._selector
        api = self._api()
        api.check_payload(event, args)
        if self._is_publication(args):
            (room,) = sel.rooms
            return await api.publish(
                PublishRequest(room=room, namespace=sel.namespace, event=event, data=args[0])
            )
        results, missing = await api.request(
            "emit", sel, {"event": event, "args": list(args)}, api.answer_timeout_s
        )
        return Reach(_count(results), missing)

    def _is_publication(self, args: tuple[Any, ...]) -> bool:
        sel = self._selector
        return (
            len(args) == 1
            and len(sel.rooms) == 1
            and not sel.except_rooms
            and sel.user is None
            and sel.socket is None
        )

    async def emit_with_ack(self, event: str, *args: Any) -> AckResult:
        """Send ``event`` asking every selected socket for an ack; wait up to the timeout."""
        check_event_name(event)
        api = self._api()
        api.check_payload(event, args)
        timeout = self._timeout_s if self._timeout_s is not None else DEFAULT_ACK_TIMEOUT_S
        results, missing_instances = await api.request(
            "emit_ack",
            self._selector,
            {"event": event, "args": list(args), "timeout_s": timeout},
            timeout + api.answer_timeout_s,
        )
        acks: list[tuple[str, Any]] = []
        missing: list[str] = []
        for result in results:
            for pair in _list(result, "acks"):
                if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str):
                    acks.append((pair[0], pair[1]))
            missing.extend(sid for sid in _list(result, "missing") if isinstance(sid, str))
        return AckResult(acks, missing, missing_instances)

    async def fetch_sockets(self) -> SocketList:
        api = self._api()
        results, missing = await api.request("fetch", self._selector, {}, api.answer_timeout_s)
        return SocketList(
            (
                info
                for result in results
                for item in _list(result, "sockets")
                if (info := SocketInfo.from_json(item)) is not None
            ),
            missing,
        )

    async def count(self) -> RoomCount:
        """How many sockets are selected, and how many distinct users they belong to."""
        api = self._api()
        results, missing = await api.request("count", self._selector, {}, api.answer_timeout_s)
        users: set[str] = set()
        for result in results:
            users.update(user for user in _list(result, "users") if isinstance(user, str))
        return RoomCount(_count(results), len(users), missing)

    async def sockets_join(self, rooms: str | Iterable[str]) -> Reach:
        return await self._act("join", {"rooms": _room_list(rooms)})

    async def sockets_leave(self, rooms: str | Iterable[str]) -> Reach:
        return await self._act("leave", {"rooms": _room_list(rooms)})

    async def disconnect_sockets(self, reason: str | None = None, *, close: bool = False) -> Reach:
        """Disconnect the selected sockets; the client gets ``roomcast:disconnect`` with code
        ``server_disconnect`` and ``reason`` as the message first.  With ``close``, their
        connections close too (Socket.IO's ``disconnectSockets(true)``): a client in several
        namespaces loses them all."""
        args: dict[str, Any] = {"reason": reason or "disconnected by the server"}
        if close:
            args["close"] = True
        return await self._act("disconnect", args)

    async def _act(self, op: str, args: dict[str, Any]) -> Reach:
        api = self._api()
        results, missing = await api.request(op, self._selector, args, api.answer_timeout_s)
        return Reach(_count(results), missing)


def _list(result: dict[str, Any], name: str) -> list[Any]:
    """An answer's list field; anything else (another version's answer) counts as empty."""
    value = result.get(name)
    return value if isinstance(value, list) else []


def _count(results: list[dict[str, Any]]) -> int:
    """The sum of the answers' ``sockets`` counts (a count that is not one counts 0)."""
    counts = (r.get("sockets") for r in results)
    return sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c >= 0)


def _room_list(rooms: str | Iterable[str]) -> list[str]:
    names = [rooms] if isinstance(rooms, str) else list(rooms)
    return sorted(_rooms("rooms", names))
