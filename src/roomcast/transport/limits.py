"""What one HTTP connection may cost before its request is handled: sizes, times, and how many
connections one client address may hold.  Shared by every connection of a listener."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

RefusalHandler = Callable[[str], None]
"""Told the reason of every refused or timed-out connection (a metric label)."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    body_bytes: int = 1_000_000 + 64 * 1024
    """A request body larger than this is answered 413 without being read."""
    head_bytes: int = 16 * 1024
    """Request line and headers together; over it: 414 (the URL alone) or 431."""
    headers: int = 100
    """Header lines in one request; over it: 431."""
    head_timeout_s: float = 10.0
    """A connection must send a complete request head this soon after it opens or after it
    starts a request; else it is closed (408 if it had started one)."""
    idle_timeout_s: float = 60.0
    """A keep-alive connection with no request in progress is closed after this long."""
    connections_per_ip: int = 0
    """Open connections one client address may hold (0: no cap)."""
    trusted_proxies: frozenset[str] = field(default_factory=frozenset)
    """Peers whose ``X-Forwarded-For`` names the client address (a load balancer)."""


class ClientAddresses:
    """Counts the open connections of each client address against ``connections_per_ip``,
    and holds the refused connections that are still being closed (see ``lingering``)."""

    __slots__ = ("_counts", "limits", "lingering", "refused")

    def __init__(self, limits: HttpLimits, refused: RefusalHandler) -> None:
        self.limits = limits
        self.refused = refused
        self._counts: dict[str, int] = {}
        self.lingering: set[asyncio.BaseTransport] = set()
        """Refused connections whose input is discarded for a moment before they close."""

    def close_lingering(self) -> None:
        """Close every refused connection now (the listener stops)."""
        for transport in self.lingering:
            transport.close()
        self.lingering.clear()

    def trusted(self, peer: str) -> bool:
        return peer in self.limits.trusted_proxies

    def acquire(self, address: str) -> bool:
        """Count one more connection of ``address``; False (nothing counted) over the cap."""
        cap = self.limits.connections_per_ip
        count = self._counts.get(address, 0)
        if cap and count >= cap:
            return False
        self._counts[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._counts.get(address, 0) - 1
        if count > 0:
            self._counts[address] = count
        else:
            self._counts.pop(address, None)

    def holding(self, address: str) -> int:
        return self._counts.get(address, 0)


def forwarded_client(header: str, trusted: frozenset[str]) -> str | None:
    """The client address in an ``X-Forwarded-For`` header: the nearest hop that is not one
    of our trusted proxies (each proxy appends the address it received from).  ``None`` if
    the header holds no valid address."""
    for hop in reversed(header.split(",")):
        candidate = hop.strip()
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return None
        if candidate not in trusted:
            return candidate
    return None
