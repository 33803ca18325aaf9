"""The Redis broker (single server or Redis Cluster), one module per part; see
:mod:`roomcast.broker.redis.broker` for how they fit together."""

from roomcast.broker.redis.broker import RedisBroker

__all__ = ["RedisBroker"]
