"""Roomcast: a real-time gateway speaking Socket.IO v5 / Engine.IO v4."""

from roomcast.app import Application, ConnectRefusedError
from roomcast.socket import Socket

__all__ = ["Application", "ConnectRefusedError", "Socket"]
__version__ = "0.1.0"
