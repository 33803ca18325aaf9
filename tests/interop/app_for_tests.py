"""The server-side handlers the interop tests talk to: ``roomcast serve --app app_for_tests:app``.

- ``echo``: the ack repeats the event's arguments (binary parts included);
- ``ping-me``: the server calls the client (``server-ask`` with 41, waiting for its ack) and
  emits the client's answer back as ``client-answered``; the ack says whether that worked;
- ``/admin``: a namespace whose connect handler emits ``admin-welcome``;
- ``/docs``: a namespace with no handlers of its own (rooms and built-ins only);
- the server-side API, in ``/`` and ``/docs``: ``shout`` (room, text) emits ``shouted`` to the
  room on every instance; ``ask-room`` (room, seconds) asks the rest of the room ``question``
  and acks what came back; ``start-beat`` (room) lets a startup task emit ``beat`` to the room
  every 200 ms.
- ``rename``: a handler with a schema (``{"name": 1-20 characters}``); the ack echoes the name.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from roomcast import Application, Socket

app = Application()


@app.on("echo")
async def echo(socket: Socket, *args: Any) -> tuple[Any, ...]:
    return args


@app.on("ping-me")
async def ping_me(socket: Socket) -> dict[str, Any]:
    try:
        async with asyncio.timeout(5.0):
            answer = await socket.call("server-ask", 41)
    except TimeoutError:
        return {"ok": False, "error": "the client did not ack server-ask"}
    socket.emit("client-answered", *answer)
    return {"ok": True}


@app.on_connect("/admin")
async def admin_welcome(socket: Socket) -> None:
    socket.emit("admin-welcome", {"user": socket.user_id, "namespace": socket.namespace.name})


app.namespace("/docs")


async def shout(socket: Socket, room: str, text: str) -> dict[str, Any]:
    nsp = socket.namespace.name
    await app.of(nsp).to(room).emit("shouted", {"from": socket.id, "text": text})
    return {"ok": True}


async def ask_room(socket: Socket, room: str, seconds: float) -> dict[str, Any]:
    operator = app.of(socket.namespace.name).to(room).except_(socket.id).timeout(seconds)
    result = await operator.emit_with_ack("question", "ready?")
    return {
        "acks": sorted([sid, response] for sid, response in result.acks),
        "missing": sorted(result.missing),
        "missing_instances": result.missing_instances,
    }


for _nsp in ("/", "/docs"):
    app.on("shout", namespace=_nsp)(shout)
    app.on("ask-room", namespace=_nsp)(ask_room)

_beat_rooms: asyncio.Queue[str] = asyncio.Queue()


@app.on("start-beat")
async def start_beat(socket: Socket, room: str) -> dict[str, Any]:
    _beat_rooms.put_nowait(room)
    return {"ok": True}


@app.on_startup
async def beat() -> None:
    """The application's own background task: once asked, emit to a room from outside any
    handler, as an app's periodic job would."""
    room = await _beat_rooms.get()
    n = 0
    while True:
        await app.to(room).emit("beat", {"n": n, "pid": os.getpid()})
        n += 1
        await asyncio.sleep(0.2)


RENAME_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 20}},
}


@app.on("rename", schema=RENAME_SCHEMA)
async def rename(socket: Socket, data: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "name": data["name"]}
