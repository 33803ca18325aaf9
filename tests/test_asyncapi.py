"""``roomcast asyncapi``: the document is AsyncAPI 3.0 by the AsyncAPI parser from npm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from redis_fixtures import require_binary

TESTS = Path(__file__).resolve().parent
CHECKER = TESTS / "asyncapi"
SCHEMAS = {
    "chat": {
        "type": "object",
        "required": ["text"],
        "additionalProperties": False,
        "properties": {"text": {"type": "string", "maxLength": 50}},
    },
    "note": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"text": {"type": "string"}},
        "type": "object",
        "properties": {"text": {"$ref": "#/definitions/text"}, "never": False},
    },
    "doc:edit op": True,
}


@pytest.fixture(scope="module")
def checker() -> Path:
    """``tests/asyncapi/node_modules`` (``npm ci`` once if it is missing)."""
    node = require_binary("node")
    if not (CHECKER / "node_modules" / "@asyncapi" / "parser" / "package.json").is_file():
        npm = require_binary("npm")
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CHECKER,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"npm ci failed:\n{result.stdout}\n{result.stderr}")
    return Path(node)


def _validate(node: Path, document: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [str(node), str(CHECKER / "validate.mjs"), str(document)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def _asyncapi(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run ``roomcast asyncapi -o FILE ARGS`` and return the document it wrote."""
    out = tmp_path / "asyncapi.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    env["PYTHONPATH"] = str(TESTS / "interop")
    result = subprocess.run(
        [sys.executable, "-m", "roomcast", "asyncapi", "-o", str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def _operations(summary: dict[str, Any], channel: str) -> dict[str, tuple[str, list[str]]]:
    """Operations of ``channel`` by their message's name: (action, reply message ids)."""
    return {
        f"{o['action']} {o['messages'][0]}": (o["action"], o["replies"])
        for o in summary["operations"]
        if o["id"].startswith(channel + "_")
    }


def test_the_document_of_a_configured_gateway_is_valid_asyncapi_3(
    tmp_path: Path, checker: Path
) -> None:
    """With schemas, upstream events and an app, the document passes the AsyncAPI parser and
    lists every client event with its ack and every event the gateway sends."""
    schemas = tmp_path / "schemas.json"
    schemas.write_text(json.dumps(SCHEMAS))
    document = _asyncapi(
        tmp_path,
        "--event-schemas",
        str(schemas),
        "--upstream-events",
        "chat,typing",
        "--app",
        "app_for_tests:app",
    )
    path = tmp_path / "asyncapi.json"
    code, summary = _validate(checker, path)
    assert code == 0 and summary["errors"] == [], summary["errors"]
    assert summary["version"] == "3.0.0"
    assert summary["channels"] == ["namespace_main", "namespace_admin", "namespace_docs"]
    main = _operations(summary, "namespace_main")
    assert main["receive join"] == ("receive", ["roomAck"])
    assert main["receive leave"] == ("receive", ["roomAck"])
    assert main["receive publish"] == ("receive", ["storedAck"])
    assert main["receive refresh"] == ("receive", ["refreshAck"])
    assert main["receive chat"] == ("receive", ["storedAck"])
    assert main["receive typing"] == ("receive", ["storedAck"])
    for handler in ("echo", "ping-me", "rename"):
        assert main[f"receive {handler}"] == ("receive", ["handlerAck"])
    for sent in ("chat", "note", "doc:edit op", "publication", "roomcast:disconnect"):
        assert main[f"send {sent}"] == ("send", [])
    admin = _operations(summary, "namespace_admin")
    assert "receive join" in admin and "receive rename" not in admin
    assert "receive shout" in _operations(summary, "namespace_docs")

    components = document["components"]
    chat = components["messages"]["upstream_chat"]["payload"]["$ref"].rsplit("/", 1)[1]
    assert components["schemas"][chat] == SCHEMAS["chat"]
    note = components["schemas"]["event_note"]
    assert "$schema" not in note
    assert note["properties"]["text"] == {
        "$ref": "#/components/schemas/event_note/definitions/text"
    }
    rename = components["messages"]["handler_main_rename"]["payload"]["$ref"]
    assert components["schemas"][rename.rsplit("/", 1)[1]]["required"] == ["name"]
    error = components["schemas"]["AckError"]["properties"]["error"]
    assert "invalid_payload" in error["properties"]["code"]["enum"]


def test_the_document_of_a_bare_gateway_is_valid(tmp_path: Path, checker: Path) -> None:
    """Without schemas or an app: the built-ins and the generic events alone."""
    _asyncapi(tmp_path, "--host", "gateway.example", "--port", "443")
    code, summary = _validate(checker, tmp_path / "asyncapi.json")
    assert code == 0 and summary["errors"] == [], summary["errors"]
    assert sorted(_operations(summary, "namespace_main")) == [
        "receive join",
        "receive leave",
        "receive publish",
        "receive refresh",
        "send publication",
        "send roomcast:disconnect",
    ]


def test_the_validator_refuses_a_broken_document(tmp_path: Path, checker: Path) -> None:
    """The check is real: an operation whose message is not its channel's is an error."""
    document = _asyncapi(tmp_path)
    operation = document["operations"]["namespace_main_receive_join"]
    operation["messages"] = [{"$ref": "#/components/messages/leave"}]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    code, summary = _validate(checker, broken)
    assert code == 1 and summary["errors"], summary
