"""Small shared type aliases."""

from __future__ import annotations

from typing import NewType

SessionId = NewType("SessionId", str)
"""An Engine.IO session id: names one client connection (all its namespaces)."""

SocketId = NewType("SocketId", str)
"""A Socket.IO socket id: names one client's membership of one namespace."""
