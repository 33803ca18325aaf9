"""Binary to rooms and the msgpack parser, with the official socket.io-client (Node) and the
official ``socket.io-msgpack-parser`` against a real ``roomcast serve`` (tests/interop/binary.mjs).

One server per parser: ``--parser json`` (the default) and ``--parser msgpack``; each runs the
same script over websocket, polling, and polling upgraded to websocket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Mint, NodeScripts, RoomcastServer, ServerFactory

OK = {"ok": True}
TRANSPORTS = {"websocket": ["websocket"], "polling": ["polling"], "upgrading": None}


def blob(salt: str) -> dict[str, str]:
    """What lib.mjs's describe() makes of binary.mjs's blob(salt), received as a Buffer."""
    return {"binary": "Buffer", "hex": (bytes(range(256)) + salt.encode()).hex()}


@pytest.fixture(scope="module", params=["json", "msgpack"])
def parser_server(
    request: pytest.FixtureRequest, module_roomcast_factory: ServerFactory
) -> tuple[str, RoomcastServer]:
    parser: str = request.param
    return parser, module_roomcast_factory("--parser", parser)


@pytest.mark.interop
@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_binary_publications_and_recovery(
    node_scripts: NodeScripts,
    parser_server: tuple[str, RoomcastServer],
    mint: Mint,
    transport: str,
) -> None:
    """With either parser and any transport, the official client joins, publishes JSON and a
    Buffer to its room, receives the API's JSON and ``$binary`` publications as Buffers byte for
    byte, and after a dropped transport recovers: same id, the missed binary publications
    replayed byte for byte, then live ones."""
    parser, server = parser_server
    room = f"doc:bin-{parser}-{transport}"
    config: dict[str, Any] = {
        "url": server.url,
        "token": mint("alice", rooms=("doc:*",), publish=("doc:*",)),
        "apiKey": server.credentials.api_key,
        "room": room,
        "parser": parser,
    }
    if TRANSPORTS[transport] is not None:
        config["transports"] = TRANSPORTS[transport]
    result = node_scripts.run("binary.mjs", config)

    assert result["joins"] == [OK, OK]
    assert [answer["ok"] for answer in result["published"]] == [True, True], result["published"]
    # What the socket published reached the other member of the room, the Buffer intact.
    peer = {e["event"]: e["args"] for e in result["peerEvents"]}
    assert peer["from-client"][0] == {"n": 1}
    assert peer["from-client-binary"][0] == {"name": "c.bin", "body": blob("client")}
    assert result["echo"] == [blob("echo"), {"nested": [{"binary": "Buffer", "hex": "00ff"}]}]

    offsets = result["offsets"]
    received = [(e["event"], e["args"]) for e in result["events"]]
    assert received == [
        ("http-json", [{"headline": "héllo"}, offsets[0]]),
        (
            "http-binary",
            [
                {"name": "h.bin", "body": blob("http"), "list": [{"binary": "Buffer", "hex": ""}]},
                offsets[1],
            ],
        ),
        ("missed", [{"body": blob("missed-1")}, offsets[2]]),
        ("missed", [{"body": blob("missed-2"), "text": "and json"}, offsets[3]]),
        ("after", [blob("after"), offsets[4]]),
    ]
    assert result["reason"] == "forced close"  # engine.close(): the transport is gone
    assert result["recovered"] is True
    assert result["secondSid"] == result["firstSid"]
    expected = "polling" if transport == "polling" else "websocket"
    assert result["transport"] == expected
