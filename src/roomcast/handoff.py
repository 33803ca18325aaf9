"""``--workers N``: a WebSocket session moves to the worker that owns its first room.

Rooms are spread over the workers by a hash of their name (:func:`owner`).  When a socket that
is in no room yet asks to join a room that another worker owns, this worker hands the session
over instead of joining:

1. it stops reading from the connection; messages already read are kept, not handled;
2. once nothing is left to write to the client, it sends the TCP connection's descriptor
   (``SCM_RIGHTS``) and the session's state (Engine.IO session, socket, token claims, the join,
   the messages kept, the bytes of a frame half read) to the owner's unix datagram socket;
3. it forgets the session without closing the connection (closing its own descriptor sends
   nothing: the owner holds another one);
4. the owner adopts the connection, restores the session and handles the join.

A room's members then gather on one worker, and a publication to the room reaches and wakes
one process instead of every worker.  The client notices nothing: the same TCP connection, the
same session and socket ids.  A session that cannot move (polling, piped from another worker,
already in a room, waiting for an ack, a server-side application with handlers of its own) or
whose move fails joins here as usual; delivery never depends on where a member is.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import logging
import os
import socket as socketlib
import zlib
from typing import Any

import orjson

from roomcast.auth import Principal
from roomcast.connection import Connection, Held
from roomcast.engine import EngineServer
from roomcast.events import join_event, join_here
from roomcast.metrics import Metrics
from roomcast.sessions import SessionWriter
from roomcast.socket import Socket
from roomcast.sockets import Client
from roomcast.transport.http import HttpConnection, Request
from roomcast.transport.ws_connection import WebSocketConnection
from roomcast.types import SessionId, SocketId

log = logging.getLogger("roomcast.handoff")

MAX_STATE = 60 * 1024
"""Bytes of state one datagram may carry; a session whose state alone is bigger stays."""
MAX_BATCH = 64
"""Sessions (descriptors) per datagram."""
MOVE_WAIT = 5.0
"""Seconds a session may wait to move (its client reading what is queued for it, the other
worker taking it); then it stays here."""
_RETRY_DELAY = 0.005
VERSION = 1


def owner(room: str, workers: int) -> int:
    """The worker that owns ``room``: the same answer in every process (CRC-32, not ``hash``)."""
    return zlib.crc32(room.encode("utf-8")) % workers


def datagram_path(worker_socket: str) -> str:
    """The handoff socket of the worker whose HTTP unix socket is ``worker_socket``."""
    return worker_socket.removesuffix(".sock") + ".handoff"


class _Move:
    __slots__ = ("ack_id", "deadline", "room", "socket", "target", "ws")

    def __init__(
        self, socket: Socket, ws: WebSocketConnection, room: str, ack_id: int | None, target: int
    ) -> None:
        self.socket = socket
        self.ws = ws
        self.room = room
        self.ack_id = ack_id
        self.target = target
        self.deadline = 0.0


class Handoff:
    """Sends sessions to the worker that owns their first room, and adopts those sent here."""

    def __init__(
        self,
        index: int,
        worker_sockets: tuple[str, ...],
        engine: EngineServer,
        writer: SessionWriter,
        metrics: Metrics,
    ) -> None:
        self.index = index
        self.workers = len(worker_sockets)
        self._paths = tuple(datagram_path(p) for p in worker_sockets)
        self._engine = engine
        self._writer = writer
        self._metrics = metrics
        self._listener: socketlib.socket | None = None
        self._sender: socketlib.socket | None = None
        self._adopting: set[asyncio.Task[None]] = set()
        self._outbox: dict[int, list[_Move]] = {}

    # -- sending ----------------------------------------------------------------------------------
    def offer(self, socket: Socket, room: str, ack_id: int | None) -> bool:
        """Called for an authorized join.  True: the session is on its way to the room's owner,
        which answers the join (or, if the move fails, this worker answers it)."""
        target = owner(room, self.workers)
        if target == self.index or not socket.movable or not self._engine.accepting:
            return False
        conn = socket.conn
        ws = conn.ws
        namespace = socket.namespace
        if (
            ws is None
            or not ws.direct
            or conn.moving is not None
            or namespace.name != "/"
            or namespace.events
            or namespace.connect
            or namespace.disconnect
        ):
            return False
        move = _Move(socket, ws, room, ack_id, target)
        conn.moving = Held(lambda: self._keep(move, "the connection closed"))
        ws.hold()
        loop = asyncio.get_running_loop()
        move.deadline = loop.time() + MOVE_WAIT
        # After the current read: the rest of what it holds is kept in ``conn.moving``.
        loop.call_soon(self._try, move)
        return True

    def _ready(self, move: _Move) -> bool:
        """Whether ``move`` can go now; if not, it is tried again later, or it stays."""
        socket = move.socket
        conn = socket.conn
        if conn.closed or conn.moving is None:
            return False  # it closed (and stayed: see ``Held``), or it already stayed
        if not socket.movable:
            self._keep(move, "the socket changed meanwhile")
            return False
        if conn.has_output() or move.ws.transport.get_write_buffer_size():
            self._later(move, "its client did not read what was queued for it")
            return False
        if self._writer.busy(socket.session_key):
            # Its recovery state must be written before the other worker writes a newer one.
            self._later(move, "its recovery state was not written")
            return False
        return True

    def _try(self, move: _Move) -> None:
        """Queue ``move`` for its worker when it is ready."""
        if self._ready(move):
            outbox = self._outbox.setdefault(move.target, [])
            outbox.append(move)
            if len(outbox) == 1:
                asyncio.get_running_loop().call_soon(self._flush, move.target)

    def _later(self, move: _Move, reason: str) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < move.deadline:
            loop.call_later(_RETRY_DELAY, self._try, move)
        else:
            self._keep(move, reason)

    def _flush(self, target: int) -> None:
        """Send the sessions queued for ``target``, many per datagram (one system call and one
        wake-up of the receiver for a burst of joins)."""
        moves = self._outbox.pop(target, [])
        moves.reverse()  # taken from the end
        while moves:
            batch: list[_Move] = []
            states: list[bytes] = []
            size = 2
            while moves and len(batch) < MAX_BATCH:
                move = moves[-1]
                if not self._ready(move):
                    moves.pop()
                    continue
                try:
                    state = self._state(move)
                except (TypeError, orjson.JSONEncodeError) as exc:
                    moves.pop()
                    self._keep(move, f"its state cannot be encoded: {exc}")
                    continue
                if state is None:
                    moves.pop()
                    self._keep(move, "a message was half received")
                    continue
                if size + len(state) + 1 > MAX_STATE:
                    if not batch:
                        moves.pop()
                        self._keep(move, f"its state is {len(state)} bytes")
                        continue
                    break
                moves.pop()
                batch.append(move)
                states.append(state)
                size += len(state) + 1
            if not batch:
                continue
            try:
                self._send(target, b"[" + b",".join(states) + b"]", batch)
            except BlockingIOError:
                # The receiver's queue is full (``net.unix.max_dgram_qlen``): try again soon.
                for move in batch + moves:
                    self._later(move, f"worker {target} took no more sessions")
                return
            except OSError as exc:
                log.warning("cannot hand %d sessions to worker %d: %s", len(batch), target, exc)
                for move in batch:
                    self._keep(move, f"worker {target} could not be reached")
                continue
            for move in batch:
                conn = move.socket.conn
                move.socket.client.detach()
                self._engine.forget(conn)
                log.debug(
                    "session %s moved to worker %d (room %s)",
                    conn.sid,
                    target,
                    move.room,
                    extra={"sid": conn.sid, "room": move.room},
                )
            self._metrics.handoffs.labels("sent").inc(len(batch))

    def _send(self, target: int, payload: bytes, batch: list[_Move]) -> None:
        fds = array.array("i")
        for move in batch:
            sock = move.ws.transport.get_extra_info("socket")
            if sock is None:
                raise OSError(f"session {move.socket.conn.sid} has no socket")
            fds.append(sock.fileno())
        sender = self._sender
        if sender is None:
            sender = self._sender = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
            sender.setblocking(False)
        sender.sendmsg(
            [payload],
            [(socketlib.SOL_SOCKET, socketlib.SCM_RIGHTS, fds)],
            0,
            self._paths[target],
        )

    def _keep(self, move: _Move, reason: str) -> None:
        """The session stays: the join is handled here (if the socket is still connected),
        then what was read meanwhile, in order; then reading goes on."""
        socket, ws = move.socket, move.ws
        conn = socket.conn
        kept = conn.moving
        if conn.closed or kept is None:
            return
        conn.moving = None
        self._metrics.handoffs.labels("kept").inc()
        log.debug(
            "session %s stays on worker %d: %s",
            conn.sid,
            self.index,
            reason,
            extra={"sid": conn.sid, "room": move.room},
        )
        if socket.connected:
            join_here(socket, move.room, move.ack_id)
        for message in kept:
            if conn.closed:
                return
            ws.peer.on_ws_message(message)
        if not conn.closed:
            ws.release()

    def _state(self, move: _Move) -> bytes | None:
        """The session's state, or ``None`` if it cannot be told whole."""
        unread = move.ws.unread()
        if unread is None:
            return None
        socket = move.socket
        conn = socket.conn
        request = conn.request
        principal = socket.principal
        delay, waiting_pong = conn.heartbeat_state()
        return orjson.dumps(
            {
                "v": VERSION,
                "sid": conn.sid,
                "request": {
                    "method": request.method,
                    "path": request.path,
                    "query": request.query,
                    "headers": request.headers,
                    "client": request.client,
                    "target": request.target,
                },
                "heartbeat": [delay, waiting_pong],
                "socket": {
                    "id": socket.id,
                    "pid": socket.pid,
                    "auth": socket.auth,
                    "user": principal.user_id,
                    "rooms": principal.rooms,
                    "publish": principal.publish,
                    "expires_at": principal.expires_at,
                    "claims": dict(principal.claims),
                },
                "join": [move.room, move.ack_id],
                "messages": [_pack(m) for m in conn.moving or ()],
                "unread": base64.b64encode(unread).decode("ascii"),
            }
        )

    # -- receiving --------------------------------------------------------------------------------
    def listen(self) -> None:
        path = self._paths[self.index]
        listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a worker that was restarted
        listener.bind(path)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._readable)

    def close(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _readable(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                data, fds, flags, _ = socketlib.recv_fds(listener, MAX_STATE + 1, MAX_BATCH)
            except BlockingIOError:
                return
            except OSError as exc:
                self._failed(f"cannot read the handoff socket: {exc}")
                return
            try:
                if flags & (socketlib.MSG_TRUNC | socketlib.MSG_CTRUNC) or len(data) > MAX_STATE:
                    raise ValueError("truncated")
                states = orjson.loads(data)
                if not isinstance(states, list) or len(states) != len(fds):
                    raise ValueError(f"{len(fds)} connections for the states")
                restored = [_Restored(state) for state in states]
            except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
                for fd in fds:
                    os.close(fd)
                self._failed(f"a handoff could not be read: {exc!r}", len(fds) or 1)
                continue
            for one, fd in zip(restored, fds, strict=True):
                try:
                    sock = socketlib.socket(fileno=fd)
                except OSError as exc:
                    os.close(fd)
                    self._failed(f"session {one.sid} came with an unusable descriptor: {exc}")
                    continue
                self._adopt(one, sock)

    def _adopt(self, restored: _Restored, sock: socketlib.socket) -> None:
        sock.setblocking(False)
        engine = self._engine
        conn = engine.add_session(restored.sid, restored.request)
        peer = engine.peer(conn)

        def ready(ws: WebSocketConnection) -> None:
            if conn.closed:  # closed (a drain) before the connection was adopted
                ws.transport.abort()
                return
            try:
                self._restore(conn, ws, restored)
            except Exception:
                log.exception("cannot restore session %s", conn.sid, extra={"sid": conn.sid})
                self._metrics.handoffs.labels("failed").inc()
                conn.close("handoff failed", notify=False)
                ws.transport.abort()

        async def attach() -> None:
            loop = asyncio.get_running_loop()
            try:
                await loop.connect_accepted_socket(
                    lambda: HttpConnection.adopted(peer, engine.options.max_payload, ready), sock
                )
            except OSError as exc:
                sock.close()
                conn.close("handoff failed", notify=False)
                self._failed(f"cannot adopt session {conn.sid}: {exc}")

        task = asyncio.get_running_loop().create_task(attach(), name="handoff-adopt")
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def _restore(self, conn: Connection, ws: WebSocketConnection, restored: _Restored) -> None:
        conn.use_websocket(ws)
        conn.resume_heartbeat(*restored.heartbeat)
        client = conn.handler
        if not isinstance(client, Client):
            raise TypeError(f"the session's handler is {type(client).__name__}, not a Client")
        socket = client.resume(restored.socket_id, restored.pid, restored.auth, restored.principal)
        self._metrics.handoffs.labels("received").inc()
        if not self._engine.accepting:  # draining: the client goes on elsewhere, and recovers
            conn.close("server shutting down")
            return
        room, ack_id = restored.join
        join_event(socket, room, ack_id)
        peer = ws.peer
        for message in restored.messages:
            if conn.closed:
                return
            peer.on_ws_message(message)
        if restored.unread and not conn.closed:
            ws.data_received(restored.unread)

    def _failed(self, reason: str, sessions: int = 1) -> None:
        self._metrics.handoffs.labels("failed").inc(sessions)
        log.warning("handoff failed: %s", reason)


class _Restored:
    """A handoff's state, checked."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.sid = SessionId(_str(state["sid"]))
        req = state["request"]
        self.request = Request(
            method=_str(req["method"]),
            path=_str(req["path"]),
            query=_str_dict(req["query"]),
            headers=_str_dict(req["headers"]),
            client=_str(req["client"]),
            target=_str(req["target"]),
            upgrade=True,
        )
        delay, waiting = state["heartbeat"]
        self.heartbeat = (float(delay), bool(waiting))
        sock = state["socket"]
        self.socket_id = SocketId(_str(sock["id"]))
        self.pid = _str(sock["pid"])
        auth = sock["auth"]
        if not isinstance(auth, dict):
            raise TypeError("auth is not an object")
        self.auth: dict[str, Any] = auth
        expires = sock["expires_at"]
        claims = sock["claims"]
        if not isinstance(claims, dict):
            raise TypeError("claims is not an object")
        self.principal = Principal(
            user_id=_str(sock["user"]),
            rooms=tuple(_str(r) for r in sock["rooms"]),
            publish=tuple(_str(r) for r in sock["publish"]),
            expires_at=None if expires is None else float(expires),
            claims=claims,
        )
        room, ack_id = state["join"]
        if ack_id is not None and not isinstance(ack_id, int):
            raise TypeError("ack id is not an integer")
        self.join: tuple[str, int | None] = (_str(room), ack_id)
        self.messages = [_unpack(m) for m in state["messages"]]
        self.unread = base64.b64decode(_str(state["unread"]), validate=True)


def _pack(message: str | bytes) -> str | dict[str, str]:
    if isinstance(message, bytes):
        return {"b": base64.b64encode(message).decode("ascii")}
    return message


def _unpack(item: object) -> str | bytes:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("b"), str):
        return base64.b64decode(item["b"], validate=True)
    raise TypeError("a kept message is neither text nor binary")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _str_dict(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return {_str(k): _str(v) for k, v in value.items()}
