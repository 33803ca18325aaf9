"""The command line: token, check-config, serve (dev and production mode) and publish."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from process_output import ProcessOutput

SECRET = "c" * 48
ROOMCAST = [sys.executable, "-m", "roomcast"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    full_env.update(env or {})
    return subprocess.run(
        [*ROOMCAST, *args], capture_output=True, text=True, env=full_env, timeout=30
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_token_prints_only_the_jwt() -> None:
    """`roomcast token` prints the JWT alone, with sub, rooms and exp from its flags."""
    out = cli(
        "token",
        "--sub",
        "u1",
        "--rooms",
        "doc:42",
        "team:7:**",
        "--ttl",
        "60",
        "--jwt-secret",
        SECRET,
    )
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert out.stdout.count("\n") == 1
    assert claims["sub"] == "u1" and claims["rooms"] == ["doc:42", "team:7:**"]
    assert 50 < claims["exp"] - time.time() <= 60


def test_token_reads_the_secret_from_env_like_serve() -> None:
    """The secret comes from ROOMCAST_JWT_SECRET exactly as for serve."""
    out = cli("token", "--sub", "u1", env={"ROOMCAST_JWT_SECRET": SECRET})
    assert jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "u1"


def test_token_refuses_a_pattern_that_grants_nothing() -> None:
    """A '*' inside a segment is no wildcard: token exits 2 naming the pattern, prints no JWT."""
    out = cli("token", "--sub", "u1", "--rooms", "doc-*", "--jwt-secret", SECRET)
    assert out.returncode == 2 and out.stdout == ""
    assert "rooms: pattern 'doc-*'" in out.stderr and "whole" in out.stderr


def test_token_without_secret_fails_clearly() -> None:
    """Without a secret, token exits 2 naming the setting."""
    out = cli("token", "--sub", "u1")
    assert out.returncode == 2 and "jwt_secret" in out.stderr


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    """check-config reports flags, env and file settings, and names a bad value's key."""
    config = tmp_path / "roomcast.toml"
    config.write_text('port = 9001\nallowed_origins = ["https://a.example"]\n')
    out = cli("check-config", "--config", str(config), env={"ROOMCAST_PING_INTERVAL_MS": "1000"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["port"] == 9001 and shown["ping_interval_ms"] == 1000
    assert shown["allowed_origins"] == ["https://a.example"]
    bad = cli("check-config", "--port", "abc")
    assert bad.returncode == 2 and "port" in bad.stderr
    unknown = tmp_path / "bad.toml"
    unknown.write_text("prot = 1\n")
    out = cli("check-config", "--config", str(unknown))
    assert out.returncode == 2 and "'prot'" in out.stderr


def test_production_mode_refuses_missing_settings() -> None:
    """Production mode refuses to start without a secret, an API key and an origin list."""
    out = cli("serve", "--production", "--port", str(free_port()))
    assert out.returncode == 2
    assert (
        "jwt_secret" in out.stderr and "api_key" in out.stderr and "allowed_origins" in out.stderr
    )


def test_production_mode_refuses_anonymous_access_and_any_origin() -> None:
    """Production mode refuses --no-auth-required and --allowed-origins '*', naming the key."""
    base = ("serve", "--production", "--port", str(free_port()), "--jwt-secret", "s" * 48)
    base += ("--api-key", "k" * 32)
    anonymous = cli(*base, "--allowed-origins", "https://app.example", "--no-auth-required")
    assert anonymous.returncode == 2 and "auth_required" in anonymous.stderr
    anywhere = cli(*base, "--allowed-origins", "*")
    assert anywhere.returncode == 2 and "allowed_origins" in anywhere.stderr


def test_check_config_masks_the_redis_password() -> None:
    """check-config prints the Redis URL with its password masked."""
    out = cli("check-config", "--redis-url", "redis://app:hunter2@cache.internal:6379/0")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["redis_url"]
    assert shown == "redis://app:***@cache.internal:6379/0" and "hunter2" not in out.stdout


@pytest.fixture
def dev_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_")}
    proc = subprocess.Popen(
        [*ROOMCAST, "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    with proc:
        yield port, proc
        proc.terminate()
        proc.wait(10)


def test_dev_mode_prints_token_and_curl(dev_server: tuple[int, subprocess.Popen[str]]) -> None:
    """`roomcast serve` with no configuration prints a dev token and a curl line, then serves."""
    port, proc = dev_server
    assert proc.stdout is not None
    lines = ProcessOutput(proc.stdout).wait_for(
        "ready line", lambda lines: any(line.startswith("roomcast ready") for line in lines), 15
    )
    text = "".join(lines)
    assert "DEVELOPMENT MODE" in text, text
    key = re.search(r"Authorization: Bearer ([^']+)'", text)
    assert key is not None
    published = cli(
        "publish",
        "--room",
        "doc:1",
        "--event",
        "hi",
        "--data",
        '{"a":1}',
        "--port",
        str(port),
        "--api-key",
        key.group(1),
    )
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["room"] == "doc:1"
    refused = cli(
        "publish",
        "--room",
        "doc:1",
        "--event",
        "hi",
        "--data",
        "1",
        "--port",
        str(port),
        "--api-key",
        "x",
    )
    assert refused.returncode == 1 and "401" in refused.stderr


def test_every_setting_is_documented() -> None:
    """docs/operations.md lists every setting's flag and environment variable."""
    import dataclasses

    from roomcast.config import Settings

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`--{f.name.replace('_', '-')}`" in doc, f.name
        assert f"`ROOMCAST_{f.name.upper()}`" in doc, f.name


def test_dev_mode_stops_at_once_unless_the_drain_is_configured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In development mode the drain delay and window are 0, unless given; with a key
    configured, their defaults hold."""
    from roomcast.cli import _dev_defaults
    from roomcast.config import Settings

    dev = _dev_defaults(Settings())
    assert (dev.drain_delay_s, dev.drain_window_s) == (0.0, 0.0)
    given = _dev_defaults(Settings(drain_delay_s=3.0), frozenset({"drain_delay_s"}))
    assert (given.drain_delay_s, given.drain_window_s) == (3.0, 0.0)
    keyed = _dev_defaults(Settings(jwt_secret=SECRET))
    assert (keyed.drain_delay_s, keyed.drain_window_s) == (5.0, 10.0)
    assert "DEVELOPMENT MODE" in capsys.readouterr().out


def test_drain_settings_are_read_and_checked() -> None:
    """The drain settings come from flags or the environment, are reported as given, and a
    negative one is refused naming it."""
    from roomcast.config import ConfigError, load_given

    settings, given = load_given({"drain_window_s": "2.5"}, {"ROOMCAST_DRAIN_DELAY_S": "1"})
    assert (settings.drain_delay_s, settings.drain_window_s) == (1.0, 2.5)
    assert {"drain_delay_s", "drain_window_s"} <= given and "drain_seconds" not in given
    with pytest.raises(ConfigError, match="drain_delay_s must be 0 or more"):
        load_given({"drain_delay_s": "-1"}, {})
