"""``--log-format json``: one JSON object per line with context fields, and no secret or token
in any log line, whatever the format."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import urllib.request
from typing import TYPE_CHECKING, Any

import jwt
import multi_fixtures
import pytest
from conftest import http_json
from multi_fixtures import ClientsError, NodeClients

from conftest_helpers import token_for
from roomcast.config import Settings, redact_url
from roomcast.logs import _CONTEXT, JsonFormatter, Redactor, identify, log_context
from wire import connect_sio, running

if TYPE_CHECKING:
    from conftest import Credentials, Mint
    from multi_fixtures import GatewayFactory

gateways = multi_fixtures.gateways
node_clients = multi_fixtures.node_clients


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("roomcast.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_context_given() -> None:
    """A record becomes one JSON object: time, level, logger, message, pid, and the context."""
    line = JsonFormatter().format(_record("refused %s", "x", sid="abc", user="u1", other="no"))
    value = json.loads(line)
    assert value["message"] == "refused x" and value["level"] == "warning"
    assert value["logger"] == "roomcast.test" and value["time"].endswith("Z")
    assert (value["sid"], value["user"]) == ("abc", "u1") and "other" not in value
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]


def test_redactor_masks_secrets_and_jwts() -> None:
    """Configured secrets and anything shaped like a JWT become ***, in messages, arguments
    and tracebacks."""
    token = jwt.encode({"sub": "alice"}, "k" * 32)
    redactor = Redactor(["s3cret-api-key-123", "short"])
    record = _record("key %s and token %s", "s3cret-api-key-123", token)
    assert redactor.filter(record)
    assert record.getMessage() == "key *** and token ***"
    try:
        raise RuntimeError(f"cannot use s3cret-api-key-123 with {token}")
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    redactor.filter(record)
    text = logging.Formatter().format(record)
    assert "s3cret" not in text and token not in text and "RuntimeError: cannot use ***" in text
    untouched = _record("short is too short to be a secret")
    redactor.filter(untouched)
    assert untouched.getMessage() == "short is too short to be a secret"


def test_context_from_the_task_and_the_process_fills_what_the_call_did_not_give() -> None:
    """A record takes ``socket``/``user`` from :data:`log_context` and ``instance``/``worker``
    from :func:`identify`, unless the call gave them with ``extra=``."""
    saved = dict(_CONTEXT.process)
    token = log_context.set({"socket": "s1", "user": "alice"})
    try:
        identify(instance="i-1", worker="01")
        record = _record("handled")
        assert _CONTEXT.filter(record)
        value = json.loads(JsonFormatter().format(record))
        assert (value["socket"], value["user"], value["instance"], value["worker"]) == (
            "s1",
            "alice",
            "i-1",
            "01",
        )
        given = _record("other", socket="s2", instance="i-2")
        _CONTEXT.filter(given)
        assert (given.socket, given.user, given.instance) == ("s2", "alice", "i-2")
        identify(instance="i-3")  # a single process has no worker
        log_context.reset(token)
        bare = _record("bare")
        _CONTEXT.filter(bare)
        value = json.loads(JsonFormatter().format(bare))
        assert value["instance"] == "i-3" and "worker" not in value and "socket" not in value
    finally:
        _CONTEXT.process = saved


async def test_an_event_handler_runs_with_its_socket_in_the_log_context() -> None:
    """While an event handler runs, :data:`log_context` names its socket, user and namespace,
    so the application's own log lines carry them; the caller's context is left as it was."""
    from roomcast import Application, Socket

    app = Application()
    seen: list[object] = []

    @app.on("note")
    async def note(socket: Socket, data: object) -> str:
        seen.append(log_context.get())
        return "noted"

    async with running(app) as node:
        raw = await connect_sio(node.port, {"token": token_for("doc:*", user="carol")})
        hello = json.loads(str(await raw.recv())[2:])
        await raw.send('421["note",1]')
        assert await raw.recv() == '431["noted"]'
        await raw.close()
    assert seen == [{"socket": hello["sid"], "user": "carol", "namespace": "/"}]
    assert log_context.get() is None


def test_secret_values_name_every_secret_setting_and_url_password() -> None:
    """What the redactor is given: the JWT secret, the API and metrics keys, and the password
    of a Redis or JWKS URL; ``redact_url`` masks such a password for display."""
    settings = Settings(
        jwt_secret="j" * 40,
        api_key="api-key-0123456789",
        metrics_key="metrics-key-0123456789",
        redis_url="redis://app:redis-pass-123@cache:6379/0",
        jwks_url="https://svc:jwks-pass-456@idp.example/keys",
    )
    values = set(settings.secret_values())
    assert {
        "j" * 40,
        "api-key-0123456789",
        "metrics-key-0123456789",
        "redis-pass-123",
        "jwks-pass-456",
    } <= values
    assert redact_url(settings.redis_url) == "redis://app:***@cache:6379/0"
    assert "redis-pass-123" not in str(settings.redacted())


def _polling_connect(
    url: str, auth: dict[str, Any] | None, query: str = "", headers: dict[str, str] | None = None
) -> str:
    """Open an Engine.IO polling session (with ``query`` and ``headers`` on its requests), send
    a Socket.IO CONNECT with ``auth``, and return the server's answer packet."""
    base = f"{url}/socket.io/?EIO=4&transport=polling{query}"
    request = urllib.request.Request(base, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        opened = response.read().decode()
    assert opened.startswith("0"), opened
    session = f"{base}&sid={json.loads(opened[1:])['sid']}"
    packet = "40" + ("" if auth is None else json.dumps(auth))
    request = urllib.request.Request(
        session, data=packet.encode(), method="POST", headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(urllib.request.Request(session, headers=headers or {})) as response:
        answer: str = response.read().decode()
    return answer


@pytest.mark.interop
def test_a_server_logs_json_and_never_a_secret(
    gateways: GatewayFactory, node_clients: NodeClients, mint: Mint, credentials: Credentials
) -> None:
    """Served with --log-format json at debug level, through refusals and successes: every
    line parses, refusals carry their context, every line names the instance, and no key or
    token appears: neither the configured ones nor the wrong ones clients sent, JWT-shaped or
    not, in the CONNECT, the query string or a header."""
    metrics_key = "metrics-" + secrets.token_hex(16)
    (server,) = gateways(
        1, "--log-format", "json", "--log-level", "debug", "--metrics-key", metrics_key
    )
    good = mint("alice", rooms=("logs:*",))
    forged = jwt.encode({"sub": "mallory", "rooms": ["*"], "exp": 2_000_000_000}, "f" * 32)
    sent = {name: f"{name}-{secrets.token_hex(16)}" for name in ("auth", "query", "header")}
    wrong_keys = [f"{credentials.api_key}-wrong", "key-" + secrets.token_hex(16)]
    wrong_metrics_key = "metrics-" + secrets.token_hex(16)
    node_clients.connect("ok", server.url, good)
    node_clients.join("ok", "logs:1")
    with pytest.raises(ClientsError, match="token_invalid"):
        node_clients.connect("bad", server.url, forged)
    # Tokens that are not JWTs, which no redaction pattern would catch: never logged at all.
    for answer in (
        _polling_connect(server.url, {"token": sent["auth"]}),
        _polling_connect(server.url, None, query=f"&token={sent['query']}"),
        _polling_connect(server.url, None, headers={"Authorization": f"Bearer {sent['header']}"}),
    ):
        assert answer.startswith("44") and "token_invalid" in answer, answer
    for key in wrong_keys:
        status, _ = http_json(
            "POST",
            f"{server.url}/api/v1/publish",
            {"room": "logs:1", "event": "e", "data": 1},
            {"Authorization": f"Bearer {key}"},
        )
        assert status == 401
    status, _ = http_json(
        "GET", f"{server.url}/metrics", headers={"Authorization": f"Bearer {wrong_metrics_key}"}
    )
    assert status == 401
    node_clients.close_client("ok")
    server.stop()
    lines = [line for line in server.stderr_path.read_text().splitlines() if line.strip()]
    assert len(lines) >= 3
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "pid"} <= set(p) for p in parsed)
    refused = [p for p in parsed if p["message"].startswith("refused namespace")]
    assert len(refused) == 4, refused
    assert all(p["reason"] == "token_invalid" and p["sid"] for p in refused)
    ours = [p for p in parsed if p["logger"].startswith("roomcast")]
    assert ours and all(p.get("instance") for p in ours), ours
    text = "\n".join(lines)
    configured = (credentials.jwt_secret, credentials.api_key, metrics_key)
    for secret in (*configured, good, forged, *sent.values(), *wrong_keys, wrong_metrics_key):
        assert secret not in text
    assert "eyJ" not in text
