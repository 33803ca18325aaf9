"""``--log-format json``: one JSON object per line with context fields, and no secret or token
in any log line, whatever the format."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING

import jwt
import multi_fixtures
import pytest
from conftest import http_json
from multi_fixtures import ClientsError, NodeClients

from roomcast.logs import JsonFormatter, Redactor

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


@pytest.mark.interop
def test_a_server_logs_json_and_never_a_secret(
    gateways: GatewayFactory, node_clients: NodeClients, mint: Mint, credentials: Credentials
) -> None:
    """Served with --log-format json at debug level, through refusals and successes: every
    line parses, refusals carry their context, and no key or token appears."""
    (server,) = gateways(1, "--log-format", "json", "--log-level", "debug")
    good = mint("alice", rooms=("logs:*",))
    forged = jwt.encode({"sub": "mallory", "rooms": ["*"], "exp": 2_000_000_000}, "f" * 32)
    node_clients.connect("ok", server.url, good)
    node_clients.join("ok", "logs:1")
    with pytest.raises(ClientsError, match="token_invalid"):
        node_clients.connect("bad", server.url, forged)
    status, _ = http_json(
        "POST",
        f"{server.url}/api/v1/publish",
        {"room": "logs:1", "event": "e", "data": 1},
        {"Authorization": f"Bearer {credentials.api_key}-wrong"},
    )
    assert status == 401
    node_clients.close_client("ok")
    server.stop()
    lines = [line for line in server.stderr_path.read_text().splitlines() if line.strip()]
    assert len(lines) >= 3
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "pid"} <= set(p) for p in parsed)
    refused = [p for p in parsed if p["message"].startswith("refused namespace")]
    assert refused and refused[0]["reason"] == "token_invalid" and refused[0]["sid"]
    text = "\n".join(lines)
    for secret in (credentials.jwt_secret, credentials.api_key, good, forged):
        assert secret not in text
    assert "eyJ" not in text
