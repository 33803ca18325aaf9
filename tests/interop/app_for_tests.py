"""The server-side handlers the interop tests talk to: ``roomcast serve --app app_for_tests:app``.

- ``echo``: the ack repeats the event's arguments (binary parts included);
- ``ping-me``: the server calls the client (``server-ask`` with 41, waiting for its ack) and
  emits the client's answer back as ``client-answered``; the ack says whether that worked;
- ``/admin``: a namespace whose connect handler emits ``admin-welcome``;
- ``rename``: a handler with a schema (``{"name": 1-20 characters}``); the ack echoes the name.
"""

from __future__ import annotations

import asyncio
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


RENAME_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 20}},
}


@app.on("rename", schema=RENAME_SCHEMA)
async def rename(socket: Socket, data: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "name": data["name"]}
