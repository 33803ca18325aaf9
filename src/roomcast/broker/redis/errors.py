"""What a failed Redis command means for the broker interface: retry later, or refused.

redis-py raises its own errors, the socket layer ``OSError``, and the event loop a
``RuntimeError`` when a command is written to a transport that closed under it.  Every public
operation of the Redis broker turns them into :class:`BrokerUnavailableError` (retryable: the
HTTP API answers 503, a client's ack says ``unavailable``) or :class:`BrokerError`.
"""

from __future__ import annotations

from typing import Final

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast.broker.base import BrokerError, BrokerUnavailableError

UNAVAILABLE_ERRORS: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    OSError,
)
"""Errors that mean "Redis cannot be reached right now" (the operation did not happen)."""

REDIS_FAILURES: Final = (RedisError, OSError, RuntimeError)
"""What a Redis command may raise: redis-py's errors, socket errors, and the event loop's
``RuntimeError`` for a write to a transport that closed under it.  :func:`_broker_error`
turns each into the broker interface's errors, so none escapes it."""

RETRY_LATER_ERRORS: Final = (
    OutOfMemoryError,
    BusyLoadingError,
    ReadOnlyError,
    MasterDownError,
    MovedError,
    AskError,
    TryAgainError,
    ClusterDownError,
    MaxConnectionsError,
)
"""Error replies of a Redis that cannot serve a command now but will: memory full, loading its
data, a replica during failover, slots moving in a cluster, no connection left in the pool."""
_RETRY_LATER_REPLIES: Final = ("OOM", "LOADING", "READONLY", "MASTERDOWN", "BUSY", "TRYAGAIN")
"""The same, by the reply's first word, for replies redis-py does not give a class."""


def unavailable(exc: BaseException) -> BrokerUnavailableError:
    detail = str(exc) or f"{type(exc).__name__} (timed out)"
    return BrokerUnavailableError(f"redis unavailable: {detail}")


def broker_error(exc: BaseException) -> BrokerError:
    """The broker interface's error for a failed Redis command: retryable
    (:class:`BrokerUnavailableError`: the link is down, stalled or reset, or Redis answered
    that it cannot serve the command now) or not (:class:`BrokerError`: Redis refused the
    command itself, for example a key of the wrong type)."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return unavailable(exc)
    if isinstance(exc, RETRY_LATER_ERRORS):
        return BrokerUnavailableError(f"redis cannot serve it now ({type(exc).__name__}): {exc}")
    if isinstance(exc, ResponseError):
        text = str(exc)
        if text.startswith(_RETRY_LATER_REPLIES):
            return BrokerUnavailableError(f"redis cannot serve it now: {text}")
        return BrokerError(f"redis refused the command: {text}")
    if isinstance(exc, RuntimeError):
        # uvloop: "unable to perform operation on <TCPTransport closed=True ...>"
        return BrokerUnavailableError(f"redis link closed mid-command: {exc}")
    return BrokerError(f"redis failed: {type(exc).__name__}: {exc}")
