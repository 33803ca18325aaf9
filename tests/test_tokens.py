"""Token refresh and revocation on live connections, through the official socket.io-client:
a refresh narrows the rooms and keeps the socket; a revocation reaches every instance."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jwt
import multi_fixtures
import pytest
from conftest import http_json
from multi_fixtures import ClientsError, NodeClients, publish_ok, redis_args

import redis_fixtures

if TYPE_CHECKING:
    from conftest import Credentials, Mint, RoomcastServer
    from multi_fixtures import GatewayFactory

pytestmark = [pytest.mark.interop]

redis_url = redis_fixtures.redis_url
redis_prefix = redis_fixtures.redis_prefix
gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients


def events_named(clients: NodeClients, name: str, event: str) -> list[Any]:
    return [e["data"] for e in clients.state(name)["events"] if e["event"] == event]


def revoke(server: RoomcastServer, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {server.credentials.api_key}"}
    status, answer = http_json("POST", f"{server.url}/api/v1/revoke", body, headers)
    assert status == 200, (status, answer)
    result: dict[str, Any] = answer
    return result


def test_refresh_narrows_rooms_and_keeps_the_socket(
    gateways: GatewayFactory, node_clients: NodeClients, mint: Mint, credentials: Credentials
) -> None:
    """A fresh token for the same user keeps the socket's id and the rooms it still allows,
    leaves the others and names them; a forged, expired or foreign token changes nothing."""
    (server,) = gateways(1)
    first = node_clients.connect("c", server.url, mint("ann", rooms=("tk:a:*", "tk:b:*"), ttl=3))
    for room in ("tk:a:1", "tk:b:1"):
        node_clients.join("c", room)

    forged = jwt.encode({"sub": "ann", "rooms": ["*"], "exp": time.time() + 60}, "x" * 32)
    expired = jwt.encode(
        {"sub": "ann", "rooms": ["*"], "iat": 1, "exp": time.time() - 60}, credentials.jwt_secret
    )
    refusals = {
        "token_invalid": forged,
        "token_expired": expired,
        "user_mismatch": mint("bob", rooms=("*",)),
    }
    for code, token in refusals.items():
        (answer,) = node_clients.emit("c", "refresh", {"token": token})
        assert answer["ok"] is False and answer["error"]["code"] == code, (code, answer)
    (answer,) = node_clients.emit("c", "refresh", {"token": "not a token at all"})
    assert answer["error"]["code"] == "token_invalid"
    (answer,) = node_clients.emit("c", "refresh", {})
    assert answer["error"]["code"] == "invalid_refresh"

    (answer,) = node_clients.emit("c", "refresh", {"token": mint("ann", rooms=("tk:a:*",))})
    assert answer == {"ok": True, "left": ["tk:b:1"]}
    assert node_clients.state("c")["id"] == first["id"]
    publish_ok(server, "tk:b:1", "to-b", 1)
    publish_ok(server, "tk:a:1", "to-a", 1)
    node_clients.wait_events("c", until="to-a")
    assert events_named(node_clients, "c", "to-b") == []
    (answer,) = node_clients.emit("c", "join", "tk:b:2")
    assert answer["error"]["code"] == "forbidden"

    # The old token's exp (3 s after connecting) passes; the refreshed one holds the socket.
    deadline = time.time() + 4.5
    while time.time() < deadline:
        node_clients.emit("c", "leave", "tk:none")  # any round trip
        time.sleep(0.5)
    state = node_clients.state("c")
    assert state["connected"] and state["disconnects"] == []
    assert events_named(node_clients, "c", "roomcast:disconnect") == []


@pytest.mark.redis
def test_revocation_reaches_every_instance(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    credentials: Credentials,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Revoking a user ends that user's sockets on all three instances with token_revoked and
    refuses the old token at connect, on every instance; a later token is welcome.  Revoking
    one token id ends only the sockets of that token."""
    servers = gateways(3, *redis_args(redis_url, redis_prefix))
    old = mint("victim", rooms=("tk:*",))
    for index, server in enumerate(servers):
        node_clients.connect(f"v{index}", server.url, old)
    node_clients.connect("bystander", servers[0].url, mint("bystander", rooms=("tk:*",)))

    started = time.monotonic()
    answer = revoke(servers[1], {"user": "victim"})
    assert answer == {"sockets": 3, "missing_instances": []}
    for index in range(3):
        assert node_clients.wait_disconnects(f"v{index}", 1, timeout=5) == ["io server disconnect"]
        notices = events_named(node_clients, f"v{index}", "roomcast:disconnect")
        assert notices == [{"code": "token_revoked", "message": "token revoked"}]
    print(f"revocation: 3 sockets on 3 instances ended within {time.monotonic() - started:.3f} s")
    assert node_clients.state("bystander")["connected"]

    for index, server in enumerate(servers):
        with pytest.raises(ClientsError, match="token_revoked"):
            node_clients.connect(f"again{index}", server.url, old)
    time.sleep(1.1)  # iat has a resolution of one second: a token of a later second
    node_clients.connect("fresh", servers[2].url, mint("victim", rooms=("tk:*",)))

    exp = int(time.time()) + 600
    claims = {"sub": "carol", "rooms": ["tk:*"], "iat": int(time.time()), "exp": exp}
    one = jwt.encode({**claims, "jti": "token-1"}, credentials.jwt_secret)
    two = jwt.encode({**claims, "jti": "token-2"}, credentials.jwt_secret)
    node_clients.connect("carol1", servers[0].url, one)
    node_clients.connect("carol2", servers[1].url, two)
    assert revoke(servers[2], {"jti": "token-1", "exp": exp})["sockets"] == 1
    assert node_clients.wait_disconnects("carol1", 1, timeout=5) == ["io server disconnect"]
    assert node_clients.state("carol2")["connected"]
    with pytest.raises(ClientsError, match="token_revoked"):
        node_clients.connect("carol1-again", servers[1].url, one)


@pytest.mark.redis
def test_an_instance_that_missed_a_revocation_catches_up(
    gateways: GatewayFactory,
    node_clients: NodeClients,
    mint: Mint,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """An instance started after a revocation loads it from Redis and refuses the token."""
    (first,) = gateways(1, *redis_args(redis_url, redis_prefix))
    old = mint("late", rooms=("tk:*",))
    revoke(first, {"user": "late"})
    (second,) = gateways(1, *redis_args(redis_url, redis_prefix))
    with pytest.raises(ClientsError, match="token_revoked"):
        node_clients.connect("late", second.url, old)


def test_a_reload_read_before_a_revocation_was_stored_does_not_forget_it() -> None:
    """A revocation learnt from a broadcast survives a reload whose read predates its storing;
    one only loaded is forgotten once the broker no longer holds it."""
    from roomcast.auth import Principal
    from roomcast.revocation import Revocations, TokenRevokedError, jti_entry, user_entry

    principal = Principal("eve", (), (), None, {"iat": 1_000, "jti": "t1"})
    known = Revocations()
    known.learn(user_entry("eve", 2_000_000))
    known.load([])  # a stale read
    with pytest.raises(TokenRevokedError):
        known.check(principal)
    loaded = Revocations()
    loaded.load([jti_entry("t1")])
    with pytest.raises(TokenRevokedError):
        loaded.check(principal)
    loaded.load([])
    loaded.check(principal)
