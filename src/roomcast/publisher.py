"""The Python API for publishing to rooms: the same path as the HTTP publish API.

>>> publisher = Publisher.from_url("redis://localhost:6379/0")   # doctest: +SKIP
>>> await publisher.publish("chat:42", "message", {"text": "hi"})  # doctest: +SKIP
PublishResult(id='...', offset='1700000000000-0', duplicate=False)

Both build a :class:`~roomcast.broker.base.PublishRequest` and call ``broker.publish``; the
broker encodes the one envelope format (:mod:`roomcast.broker.envelope`).

With tracing on in this process (``roomcast.tracing.enable()`` in a service that set
OpenTelemetry up itself; ``roomcast publish`` with the ``OTEL_*`` variables), each publish is a
``roomcast publish`` span, a child of ``traceparent`` or else of the current span.
"""

from __future__ import annotations

import roomcast.tracing as tracing
from roomcast.auth import validate_room
from roomcast.broker.base import Broker, JSONValue, PublishRequest, PublishResult
from roomcast.broker.envelope import check_traceparent
from roomcast.broker.topics import validate_namespace
from roomcast.protocol.socketio import check_event_name
from roomcast.schemas import EventSchemas

__all__ = ["Publisher"]


class Publisher:
    """Publishes events to rooms through a broker.

    A publisher made with :meth:`from_url` owns its broker and closes it in :meth:`close`;
    one given a broker leaves it to its owner.
    """

    def __init__(
        self, broker: Broker, *, owns_broker: bool = False, schemas: EventSchemas | None = None
    ) -> None:
        self._broker = broker
        self._owns_broker = owns_broker
        self._schemas = schemas if schemas is not None else EventSchemas()

    @classmethod
    def from_url(
        cls, redis_url: str, *, prefix: str = "roomcast", schemas: EventSchemas | None = None
    ) -> Publisher:
        """A publisher on its own :class:`~roomcast.broker.redis.RedisBroker` (connects lazily).

        With ``schemas`` (the gateway's ``--event-schemas``), data is checked before it is
        stored; without, a gateway that has a schema for the event drops what fails it."""
        from roomcast.broker.redis import RedisBroker

        return cls(RedisBroker(redis_url, prefix=prefix), owns_broker=True, schemas=schemas)

    @property
    def broker(self) -> Broker:
        return self._broker

    async def publish(
        self,
        room: str,
        event: str,
        data: JSONValue,
        *,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        namespace: str = "/",
    ) -> PublishResult:
        """Publish ``event`` with ``data`` to ``room`` of ``namespace`` (every namespace has
        its own rooms; a namespace no gateway application defines reaches nobody).

        ``data`` is any JSON value, and may hold ``bytes`` (``bytearray``, ``memoryview``)
        anywhere: clients receive them as binary attachments (a ``Buffer`` in Node, an
        ``ArrayBuffer`` in browsers).

        Raise :class:`~roomcast.auth.InvalidRoomError` for a bad room name,
        :class:`~roomcast.broker.envelope.EnvelopeError` for data that is neither JSON nor
        bytes, or a bad field, :class:`~roomcast.protocol.errors.EventNameError` for an event
        name clients may not be sent (socket.io's own, or ``roomcast:...``), and
        :class:`~roomcast.broker.base.BrokerUnavailableError` when nothing was stored
        (retrying with the same ``idempotency_key`` is then safe), and
        :class:`~roomcast.schemas.InvalidPayloadError` when the event has a schema that
        ``data`` fails (its ``details`` name the failing path).

        ``traceparent``, a W3C trace context, travels with the publication: the instances that
        deliver it make their spans children of it (with tracing on there).
        """
        validate_room(room)
        validate_namespace(namespace)
        check_event_name(event)
        if traceparent is not None:  # refused with tracing on or off alike
            check_traceparent(traceparent)
        self._schemas.check(event, data)
        request = PublishRequest(
            room=room,
            namespace=namespace,
            event=event,
            data=data,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
        )
        traced = tracing.active
        if traced is None:
            return await self._broker.publish(request)
        return await traced.publish(
            self._broker.publish, request, source="publisher", instance=self._broker.instance_id
        )

    async def close(self) -> None:
        """Release the broker if this publisher created it."""
        if self._owns_broker:
            await self._broker.stop()
