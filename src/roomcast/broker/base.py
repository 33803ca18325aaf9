"""The broker concept: how publications travel between publishers and gateway instances.

A broker moves :class:`Publication` values.  It never knows about sockets or rooms' members:
the node registers one delivery handler with :meth:`Broker.start`, and the broker calls it for
every publication of a room this instance subscribed to, in publish order per room.

Rooms are named by *topic* (:mod:`roomcast.broker.topics`): a room of the main namespace by its
own name, room ``r`` of namespace ``/n`` as ``/n#r``.  The ``room`` argument of
:meth:`Broker.subscribe`, :meth:`Broker.unsubscribe` and :meth:`Broker.history` is a topic; a
:class:`Publication` carries its namespace and room apart, and its :attr:`Publication.topic`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from roomcast.broker.topics import topic

JSONValue = Any
"""Any value orjson can encode."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One event published to one room.

    ``offset`` is the broker-assigned, per-room monotonically increasing position of the
    publication (for Redis, the stream entry id).  It is what the official client sends back for
    connection state recovery, so it is the same for every recipient of the publication.
    """

    room: str
    event: str
    data: JSONValue
    id: str
    """Publication id, unique per publication; returned to the publisher."""
    offset: str = ""
    idempotency_key: str | None = None
    traceparent: str | None = None
    published_at_ms: int = 0
    exclude_sid: str | None = None
    """A Socket.IO socket id that must not receive this publication (client publishing)."""
    origin: str | None = None
    """Broker-private tag (for example the instance that produced it)."""
    namespace: str = "/"
    """The Socket.IO namespace whose room this is (every namespace has its own rooms)."""

    @property
    def topic(self) -> str:
        """What the broker calls this room (see :mod:`roomcast.broker.topics`)."""
        return topic(self.namespace, self.room)


@dataclass(frozen=True, slots=True)
class PublishRequest:
    room: str
    event: str
    data: JSONValue
    idempotency_key: str | None = None
    traceparent: str | None = None
    exclude_sid: str | None = None
    namespace: str = "/"

    @property
    def topic(self) -> str:
        return topic(self.namespace, self.room)


@dataclass(frozen=True, slots=True)
class PublishResult:
    id: str
    """The publication id; for a repeated idempotency key, the id of the original publication."""
    offset: str
    duplicate: bool = False


class BrokerState(enum.Enum):
    STARTING = "starting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class History:
    """What a broker could find after an offset.

    ``complete`` is false when events may be missing (history trimmed or expired); callers must
    then not claim a full recovery.
    """

    publications: list[Publication] = field(default_factory=list)
    complete: bool = True


@dataclass(frozen=True, slots=True)
class UserQuota:
    """What one user may open, counted across every instance on the broker (see
    :meth:`Broker.admit_user`); 0 turns a limit off."""

    per_window: int = 0
    """New connections (namespace connects) per fixed window of ``window_ms``."""
    window_ms: int = 60_000
    concurrent: int = 0
    """Connections held at once; each is forgotten ``ttl_ms`` after it was last kept alive."""
    ttl_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of :meth:`Broker.admit_user`: ``limit`` is None when admitted, else the
    limit that refused (``user_connect_rate`` or ``user_connections``); ``retry_after_ms``:
    when the window ends (``user_connect_rate``; 0 for the other, which frees on a close)."""

    limit: str | None = None
    retry_after_ms: int = 0


class BrokerError(Exception):
    """Base of all broker failures."""


class BrokerUnavailableError(BrokerError):
    """The broker's backend cannot be reached right now.

    The operation may not have been performed (after a timeout it may have been): publishers
    retry with an idempotency key to be safe either way.
    """


DeliveryHandler = Callable[[Publication], object]
"""Called by the broker, in the event loop, for every publication of a subscribed room (what it
returns is ignored)."""

ControlHandler = Callable[[bytes], None]
"""Called by the broker, in the event loop, for every control message sent to this instance."""

PayloadCheck = Callable[[Publication], str | None]
"""Why a publication read from the broker may not be delivered (its data fails its event's
schema), or None; given by the node, so a broker refuses what a raw ``XADD`` got wrong."""

BatchScope = Callable[[], AbstractContextManager[None]]
"""Entered by a broker around publications it delivers back to back (one fetch's worth), so the
node can send what each client gets from them as one write."""


class Broker(Protocol):
    """The narrow interface the node uses.  Implementations: ``memory.py``, ``redis.py``."""

    @property
    def state(self) -> BrokerState: ...

    @property
    def ready(self) -> bool:
        """Connected and able to deliver (for Redis: keyspace notifications reach us)."""

    async def start(self, handler: DeliveryHandler, *, batch: BatchScope | None = None) -> None:
        """Connect and begin delivering publications of subscribed rooms to ``handler``.

        A broker that delivers several publications at once enters ``batch()`` around them."""

    async def stop(self) -> None:
        """Stop delivering and release every resource."""

    async def publish(self, request: PublishRequest) -> PublishResult:
        """Append a publication; raise :class:`BrokerUnavailableError` if it was not stored."""

    async def subscribe(self, room: str) -> None:
        """This instance now has a local member of ``room``: deliver its publications."""

    async def unsubscribe(self, room: str) -> None:
        """This instance has no local member of ``room`` any more."""

    async def history(self, room: str, after_offset: str) -> History:
        """Publications of ``room`` strictly after ``after_offset``, oldest first."""

    async def save_session(self, pid: str, state: bytes, ttl_ms: int) -> None:
        """Store a disconnected socket's recovery state (rooms, socket id) under its private id."""

    async def take_session(self, pid: str) -> bytes | None:
        """Fetch and delete a stored recovery state; ``None`` when unknown or expired."""

    async def write_sessions(self, items: list[tuple[str, bytes | None, int]]) -> None:
        """Save (state, ttl) or, with ``None``, delete many recovery states in one batch."""

    async def touch_sessions(self, pids: list[str], ttl_ms: int) -> None:
        """Extend the lifetime of stored recovery states of live sockets (one batch)."""

    @property
    def instance_id(self) -> str:
        """This instance's id among the instances on the same broker."""

    def on_control(self, handler: ControlHandler) -> None:
        """Receive control messages (call before :meth:`start`): the server API's requests
        and answers between instances.  Without a handler, none are received."""

    async def send_control(self, message: bytes, instance: str | None = None) -> None:
        """Send a control message to one instance, or (``None``) to every live instance,
        this one included.  At most once: a message sent while an instance is disconnected
        from the broker is lost for it (callers time out)."""

    async def instances(self) -> list[str]:
        """The ids of the instances that were alive in the last few seconds, this one
        included once started."""

    async def revoke(self, entry: str, until_ms: int) -> None:
        """Store a revocation entry (``roomcast.revocation``) until ``until_ms`` (Unix ms)."""

    async def revocations(self) -> list[str]:
        """Every revocation entry not yet expired."""

    async def admit_user(self, user: str, member: str, quota: UserQuota) -> Admission:
        """Count a new connection of ``user`` in the current window and, if both limits allow
        it, hold it as ``member`` (one atomic step; a refused one holds nothing)."""

    async def release_users(self, held: list[tuple[str, str]]) -> None:
        """Forget held connections ``(user, member)`` (closed)."""

    async def keep_users(self, held: list[tuple[str, str]], ttl_ms: int) -> None:
        """Keep held connections ``(user, member)`` alive for ``ttl_ms`` more (live sockets);
        one not held (a broker that lost it) is held again."""

    async def append_upstream(self, fields: dict[str, str | bytes]) -> str:
        """Append a client event to the upstream stream; return its id once stored.

        Raise :class:`BrokerUnavailableError` if it was not stored.
        """
