"""python-socketio's AsyncClient against a real ``roomcast serve``: the basics, both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
import socketio

if TYPE_CHECKING:
    from conftest import Mint, RoomcastServer

TIMEOUT = 5.0
TRANSPORTS = ["websocket", "polling"]


@pytest.fixture
async def client() -> AsyncIterator[socketio.AsyncClient]:
    sio = socketio.AsyncClient(reconnection=False)
    yield sio
    await sio.disconnect()
    await sio.shutdown()


def _capture(sio: socketio.AsyncClient, event: str) -> asyncio.Future[tuple[Any, ...]]:
    """A future resolved with the arguments of the first ``event`` the client receives."""
    future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()

    async def handler(*args: Any) -> None:
        if not future.done():
            future.set_result(args)

    sio.on(event, handler)
    return future


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_connect_join_and_receive(
    client: socketio.AsyncClient, roomcast_server: RoomcastServer, mint: Mint, transport: str
) -> None:
    """A client with a valid token connects, joins a room and receives an event published to it."""
    room = f"doc:python-{transport}"
    news = _capture(client, "news")
    await client.connect(
        roomcast_server.url,
        auth={"token": mint("carol", rooms=("doc:*",))},
        transports=[transport],
        wait_timeout=TIMEOUT,
    )
    assert client.transport() == transport
    assert await client.call("join", room, timeout=TIMEOUT) == {"ok": True}

    status, body = await asyncio.to_thread(roomcast_server.publish, room, "news", {"n": 1})
    assert status == 202, body
    data, offset = await asyncio.wait_for(news, TIMEOUT)
    assert data == {"n": 1}
    assert offset == body["offset"]


async def test_forbidden_join(
    client: socketio.AsyncClient, roomcast_server: RoomcastServer, mint: Mint
) -> None:
    """Joining a room outside the token's rooms claim is acked with the forbidden code."""
    await client.connect(
        roomcast_server.url,
        auth={"token": mint("carol", rooms=("doc:*",))},
        transports=["websocket"],
        wait_timeout=TIMEOUT,
    )
    ack = await client.call("join", "team:7:x", timeout=TIMEOUT)
    assert ack["ok"] is False
    assert ack["error"]["code"] == "forbidden"


async def test_echo_ack_with_binary(
    client: socketio.AsyncClient, roomcast_server: RoomcastServer, mint: Mint
) -> None:
    """The test app's echo acks the client's arguments back, bytes included."""
    await client.connect(
        roomcast_server.url,
        auth={"token": mint()},
        transports=["websocket"],
        wait_timeout=TIMEOUT,
    )
    payload = bytes(range(256))
    answer = await client.call("echo", ("text", {"blob": payload}), timeout=TIMEOUT)
    assert answer == ("text", {"blob": payload})


@pytest.mark.parametrize(
    ("token", "code"),
    [("garbage", "token_invalid"), ("", "token_missing"), ("expired", "token_expired")],
)
async def test_bad_token_is_refused(
    client: socketio.AsyncClient,
    roomcast_server: RoomcastServer,
    expired_token: str,
    token: str,
    code: str,
) -> None:
    """A missing, malformed or expired token makes connect() raise ConnectionError with its code."""
    refused = _capture(client, "connect_error")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(
            roomcast_server.url,
            auth={"token": expired_token if token == "expired" else token},
            transports=["websocket"],
            wait_timeout=TIMEOUT,
        )
    (error,) = await asyncio.wait_for(refused, TIMEOUT)
    assert error["data"]["code"] == code
    assert error["message"]
