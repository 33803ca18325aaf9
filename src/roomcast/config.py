"""Every setting, defined once.

Each field of :class:`Settings` is settable by a command-line flag (``--jwt-secret``), an
environment variable (``ROOMCAST_JWT_SECRET``) and a TOML config file (``jwt_secret = "..."``),
in that order of precedence.  ``validate()`` names the bad key and value.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ENV_PREFIX = "ROOMCAST_"
_BCRYPT_RE = re.compile(r"\A\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
TRACING_MODES = ("auto", "on", "off")
"""Values of the ``tracing`` setting (see :mod:`roomcast.tracing`)."""
PARSER_NAMES = ("json", "msgpack")
"""The ``parser`` setting's values (``roomcast.protocol.parser.PARSERS`` has one of each)."""


class ConfigError(ValueError):
    """A setting has a bad value; the message names the key and the value."""


def _setting(default: Any, help: str, *, secret: bool = False, production: Any = None) -> Any:
    """One setting; ``production``: its default with ``--production`` (when not given)."""
    metadata = {"help": help, "secret": secret}
    if production is not None:
        metadata["production"] = production
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "port to listen on")
    production: bool = _setting(
        False,
        "refuse to start without a JWT key, an API key and an origin list; turn the rate limits on",
    )
    workers: int = _setting(1, "worker processes sharing the port (SO_REUSEPORT)")
    room_affinity: bool = _setting(
        True, "with workers: move a websocket session to the worker that owns its first room"
    )
    app: str = _setting("", "load server-side handlers from module:attribute")
    log_level: str = _setting("info", "debug, info, warning or error")
    log_format: str = _setting("text", "text, or json: one JSON object per line")

    jwt_secret: str = _setting("", "HS256/384/512 secret for client tokens", secret=True)
    jwt_public_key_file: str = _setting("", "PEM public key file for RS256/ES256 tokens")
    jwks_url: str = _setting("", "JWKS URL to fetch token signing keys from")
    jwks_cache_seconds: int = _setting(300, "how long fetched JWKS keys are cached")
    jwt_algorithms: tuple[str, ...] = _setting(
        ("HS256",), "allowed JWT algorithms, comma-separated ('none' is never accepted)"
    )
    jwt_issuer: str = _setting("", "required 'iss' claim, if set")
    jwt_audience: str = _setting("", "required 'aud' claim, if set")
    auth_required: bool = _setting(True, "require a valid JWT to connect a namespace")
    jwt_require_exp: bool = _setting(
        True, "refuse client tokens without an 'exp' claim (they would never expire)"
    )

    api_key: str = _setting("", "bearer key for the HTTP publish API", secret=True)
    ops_listen: str = _setting(
        "",
        "host:port of a second listener for /metrics, the probes and the server APIs "
        "(/api/...); when set, the main port serves neither /metrics nor /api/",
    )
    metrics_key: str = _setting(
        "",
        "bearer key /metrics requires (default none; in production without --ops-listen, "
        "/metrics requires the API key)",
        secret=True,
    )
    allowed_origins: tuple[str, ...] = _setting(
        (), "CORS / WebSocket Origin allow-list, comma-separated ('*' allows any)"
    )

    ping_interval_ms: int = _setting(25_000, "Engine.IO ping interval")
    ping_timeout_ms: int = _setting(20_000, "Engine.IO ping timeout")
    connect_timeout_ms: int = _setting(45_000, "time a client has to connect a namespace")
    max_payload: int = _setting(1_000_000, "max bytes of one HTTP body or WebSocket message")
    max_attachments: int = _setting(10, "max binary attachments of one Socket.IO packet")
    max_nesting: int = _setting(32, "max JSON nesting depth of one Socket.IO packet")
    parser: str = _setting(
        "json",
        "Socket.IO parser every client must use: json (the default parser) or msgpack "
        "(socket.io-msgpack-parser)",
    )
    outbound_buffer_limit: int = _setting(
        4 * 1024 * 1024, "bytes queued for one client before it is dropped as too slow"
    )
    max_connections: int = _setting(100_000, "connections accepted per worker")
    http_head_timeout_s: float = _setting(
        10.0, "close a connection that sends no complete request head within this time"
    )
    http_idle_timeout_s: float = _setting(
        60.0, "close a keep-alive connection idle between requests for this long"
    )
    http_max_head_bytes: int = _setting(
        16 * 1024, "max bytes of a request line and headers (414 / 431 over it)"
    )
    http_max_headers: int = _setting(100, "max header lines of one request (431 over it)")
    max_connections_per_ip: int = _setting(
        0, "open connections one client address may hold, 429 over it (0: no cap)"
    )
    trusted_proxies: tuple[str, ...] = _setting(
        (), "proxy addresses whose X-Forwarded-For names the client, comma-separated"
    )
    max_rooms_per_socket: int = _setting(
        1000, "rooms one socket may be in; a join beyond it is refused with too_many_rooms"
    )
    event_rate: float = _setting(
        0.0,
        "client events per second one socket may send, sustained; over it the ack says "
        "rate_limited (0: no limit)",
        production=100.0,
    )
    event_burst: int = _setting(
        0, "client events one socket may send at once (0: one second's worth)", production=500
    )
    join_rate: float = _setting(
        0.0, "joins per second one socket may make, sustained (0: no limit)", production=20.0
    )
    join_burst: int = _setting(
        0, "joins one socket may make at once (0: one second's worth)", production=200
    )
    rate_limit_disconnect: float = _setting(
        10.0,
        "disconnect a socket refused this many bursts more than its rate refills "
        "(rate_limited; 0: never)",
    )
    user_connect_rate: int = _setting(
        0,
        "new connections one user may open per user_connect_window_s, on every instance "
        "together (0: no limit)",
        production=120,
    )
    user_connect_window_s: float = _setting(60.0, "the window of user_connect_rate")
    max_connections_per_user: int = _setting(
        0,
        "connections one user may hold at once, on every instance together (0: no limit)",
        production=100,
    )
    user_connections_ttl_s: float = _setting(
        30.0,
        "how long a connection counts for its user after its instance last said it is open "
        "(an instance that dies stops saying so)",
    )
    api_rate: float = _setting(
        0.0,
        "publish API requests per second per API key, per worker, sustained; over it 429 "
        "(0: no limit)",
        production=5000.0,
    )
    api_burst: int = _setting(
        0, "publish API requests per API key at once (0: one second's worth)", production=10_000
    )
    revocation_ttl_s: int = _setting(
        86_400,
        "how long a user's revocation refuses that user's older tokens; at least the longest "
        "token lifetime you issue",
    )
    revocation_sync_s: float = _setting(
        5.0, "how often an instance reloads revocations from the broker (heals missed ones)"
    )

    redis_url: str = _setting("", "Redis URL; empty means the embedded in-memory broker")
    redis_prefix: str = _setting("roomcast", "prefix of every Redis key")
    history_size: int = _setting(1000, "publications kept per room for recovery")
    history_ttl_ms: int = _setting(120_000, "how long publications are kept for recovery")
    recovery_max_disconnection_ms: int = _setting(
        120_000, "how long a disconnected client may recover its session (0 disables)"
    )
    idempotency_window_ms: int = _setting(300_000, "window in which an idempotency key repeats")
    upstream_events: tuple[str, ...] = _setting(
        (), "client event names appended to the upstream stream, comma-separated"
    )
    event_schemas: str = _setting(
        "",
        "JSON file of event payload schemas: one object, event name to JSON Schema (draft-07); "
        "checks client events and publications of those events",
    )
    upstream_stream: str = _setting(
        "", "Redis stream for upstream client events (default <prefix>:upstream)"
    )
    drain_delay_s: float = _setting(
        5.0,
        "on SIGTERM, /readyz answers 503 for this long while everyone is still served, so "
        "balancers and endpoints stop sending new clients before any is told to leave "
        "(development mode: 0 unless set)",
    )
    drain_window_s: float = _setting(
        10.0,
        "after the drain delay, clients are told to leave at a steady rate over this long, "
        "so the remaining instances take them gradually (development mode: 0 unless set)",
    )
    drain_seconds: float = _setting(
        10.0,
        "after the last client was told to leave, time for polling clients to collect their "
        "close and for recovery states to be written, before the listener closes",
    )
    tracing: str = _setting(
        "auto",
        "OpenTelemetry traces (needs roomcast[otel]): on, off, or auto: on when "
        "OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_TRACES_EXPORTER=otlp is set",
    )

    admin_username: str = _setting(
        "", "Socket.IO Admin UI login name; with admin_password_hash it enables the admin namespace"
    )
    admin_password_hash: str = _setting(
        "",
        "bcrypt hash of the Admin UI password (make one with 'roomcast admin-hash')",
        secret=True,
    )
    admin_namespace: str = _setting("/admin", "namespace the Admin UI connects to")
    admin_readonly: bool = _setting(
        False, "Admin UI may look but not act (no join, leave, disconnect or emit)"
    )
    admin_socket_list_limit: int = _setting(
        2000,
        "most sockets a fresh Admin UI socket list holds (the newest; the UI's list code takes "
        "time quadratic in it, about 17 s at 10,000 in chromium); the counts cover every socket",
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        positive = (
            "port",
            "workers",
            "ping_interval_ms",
            "ping_timeout_ms",
            "connect_timeout_ms",
            "max_payload",
            "outbound_buffer_limit",
            "max_connections",
            "max_rooms_per_socket",
            "revocation_ttl_s",
            "revocation_sync_s",
            "http_head_timeout_s",
            "http_idle_timeout_s",
            "http_max_head_bytes",
            "http_max_headers",
            "history_size",
            "admin_socket_list_limit",
        )
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        for name in (
            "event_rate",
            "event_burst",
            "join_rate",
            "join_burst",
            "rate_limit_disconnect",
            "user_connect_rate",
            "max_connections_per_user",
            "api_rate",
            "api_burst",
        ):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # also refuses nan
                raise ConfigError(f"{name} must be a finite number, 0 or more, got {value!r}")
        for name in ("user_connect_window_s", "user_connections_ttl_s"):
            value = getattr(self, name)
            if not 0.1 <= value < math.inf:
                raise ConfigError(f"{name} must be at least 0.1 and finite, got {value!r}")
        for name in ("drain_delay_s", "drain_window_s", "drain_seconds"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses nan
                raise ConfigError(f"{name} must be 0 or more, got {value!r}")
        if self.max_connections_per_ip < 0:
            raise ConfigError(
                f"max_connections_per_ip must be 0 or more, got {self.max_connections_per_ip!r}"
            )
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_address(proxy)
            except ValueError:
                raise ConfigError(
                    f"trusted_proxies must hold ip addresses, got {proxy!r}"
                ) from None
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, got {self.port!r}")
        if any(a.lower() == "none" for a in self.jwt_algorithms):
            raise ConfigError("jwt_algorithms must not contain 'none'")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log_level must be debug, info, warning or error, got {self.log_level!r}"
            )
        if self.ops_listen:
            host, port = ops_address(self.ops_listen)
            if port == 0 and self.workers > 1:
                raise ConfigError("ops_listen port 0 needs workers = 1: each would pick its own")
            if (host, port) == (self.host, self.port):
                raise ConfigError(
                    f"ops_listen {self.ops_listen!r} must differ from host:port "
                    f"{self.host}:{self.port}"
                )
        self._validate_admin()
        if self.tracing not in TRACING_MODES:
            raise ConfigError(
                f"tracing must be one of {', '.join(TRACING_MODES)}, got {self.tracing!r}"
            )
        if self.parser not in PARSER_NAMES:
            raise ConfigError(f"parser must be {' or '.join(PARSER_NAMES)}, got {self.parser!r}")
        if self.app and ":" not in self.app:
            raise ConfigError(f"app must be module:attribute, got {self.app!r}")
        if self.production:
            missing = [
                name
                for name, present in (
                    (
                        "jwt_secret / jwt_public_key_file / jwks_url",
                        self.jwt_secret or self.jwt_public_key_file or self.jwks_url,
                    ),
                    ("api_key", self.api_key),
                    ("allowed_origins", self.allowed_origins),
                )
                if not present
            ]
            if missing:
                raise ConfigError(f"production mode requires {', '.join(missing)}")
            if not self.auth_required:
                raise ConfigError(
                    "production mode requires auth_required: without it the anonymous user "
                    "may join and publish to every room"
                )
            if "*" in self.allowed_origins:
                raise ConfigError(
                    "production mode does not accept allowed_origins '*': list the origins"
                )
            for name in ("api_key", "metrics_key"):
                value = getattr(self, name)
                if value and len(value) < MIN_KEY_LENGTH:
                    raise ConfigError(
                        f"production mode requires {name} of at least {MIN_KEY_LENGTH} "
                        f"characters, got {len(value)}"
                    )

    def _validate_admin(self) -> None:
        if bool(self.admin_username) != bool(self.admin_password_hash):
            raise ConfigError(
                "admin_username and admin_password_hash go together: set both or neither"
            )
        if self.admin_password_hash and _BCRYPT_RE.match(self.admin_password_hash) is None:
            raise ConfigError(
                "admin_password_hash must be a bcrypt hash ($2b$12$ and 53 characters), "
                "got a value that is not one (make one with 'roomcast admin-hash')"
            )
        if self.admin_username and self.parser != "json":
            raise ConfigError(
                "the Socket.IO Admin UI speaks the JSON parser only: it cannot be enabled "
                f"with parser {self.parser!r}"
            )
        # The namespace's own rules are checked where it is served (roomcast.admin).
        if not self.admin_namespace.startswith("/") or self.admin_namespace == "/":
            raise ConfigError(
                f"admin_namespace must be a namespace other than '/' (a '/' and a name), "
                f"got {self.admin_namespace!r}"
            )

    def secret_values(self) -> list[str]:
        """Every secret setting's value, and the password of every URL setting: what no log
        line may contain (``roomcast.logs.Redactor``)."""
        values: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and isinstance(value, str) and value:
                values.append(value)
            elif isinstance(value, str) and "://" in value:
                values.extend(_url_secrets(value))
        return values

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs and ``check-config``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = "***"
            elif isinstance(value, str):
                value = redact_url(value)
            out[f.name] = value
        return out


def ops_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as a pair; the key is ops_listen."""
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"ops_listen must be host:port (port 0-65535), got {value!r}")
    return host, int(port)


MIN_KEY_LENGTH: Final = 16
"""The shortest API or metrics key production accepts (shorter ones are guessable, and too
short for the log redactor to tell from ordinary text)."""

_SECRET_PARAMS: Final = frozenset({"password", "pass", "pwd", "token", "key", "secret"})
"""Query parameters of a URL setting that hold a secret (``redis://h/0?password=...``)."""


def _url_secrets(value: str) -> list[str]:
    parts = urlsplit(value)
    found = [parts.password] if parts.password else []
    for name, secret in parse_qsl(parts.query):
        if name.lower() in _SECRET_PARAMS and secret:
            found.append(secret)
    return found


def redact_url(value: str) -> str:
    """``value`` with the password of a URL (``redis://user:pw@host``, or a ``password=``
    query parameter) masked."""
    if "://" not in value or not _url_secrets(value):
        return value
    parts = urlsplit(value)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = [
        (name, "***" if name.lower() in _SECRET_PARAMS and secret else secret)
        for name, secret in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, kind: Any, raw: object) -> Any:
    """Turn a flag, env or file value into the field's type, or raise naming the key."""
    try:
        if kind == "bool" or kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind == "int" or kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(str(raw).replace("_", "")) if not isinstance(raw, int) else raw
        if kind == "float" or kind is float:
            return float(raw)  # type: ignore[arg-type]
        if kind == "str" or kind is str:
            if not isinstance(raw, str):
                raise ValueError(raw)
            return raw
        if str(kind).startswith("tuple"):
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            if isinstance(raw, Sequence) and all(isinstance(p, str) for p in raw):
                return tuple(raw)
            raise ValueError(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: invalid value {raw!r} ({kind})") from exc
    raise ConfigError(f"{name}: unsupported type {kind}")


def add_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Add a flag for every setting (or the ones named); defaults stay unset to keep precedence."""
    parser.add_argument("--config", default=None, help="TOML file of settings (ROOMCAST_CONFIG)")
    for f in dataclasses.fields(Settings):
        if only is not None and f.name not in only:
            continue
        default = f"default {f.default!r}"
        if "production" in f.metadata:
            default += f", {f.metadata['production']!r} with --production"
        help_text = f"{f.metadata['help']} (env {ENV_PREFIX}{f.name.upper()}, {default})"
        if f.type in ("bool", bool):
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text)


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build :class:`Settings` from flags > env > file > defaults, then validate."""
    return load_given(flags, environ, config_file)[0]


def load_given(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> tuple[Settings, frozenset[str]]:
    """:func:`load`, and the names of the settings that were given (not defaults).  With
    ``production``, a setting given nowhere takes its production default (the rate limits)."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    path = config_file or flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    from_file: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path!r}: {exc}") from exc
        section = data.get("roomcast", data)
        from_file = {str(k).replace("-", "_"): v for k, v in section.items()}
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(from_file) - set(known))
    if unknown:
        raise ConfigError(f"config file {path!r}: unknown setting {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if flags.get(name) is not None:
            values[name] = _coerce(name, f.type, flags[name])
        elif ENV_PREFIX + name.upper() in environ:
            values[name] = _coerce(name, f.type, environ[ENV_PREFIX + name.upper()])
        elif name in from_file:
            values[name] = _coerce(name, f.type, from_file[name])
    given = frozenset(values)
    if values.get("production", False):
        for name, f in known.items():
            if name not in values and "production" in f.metadata:
                values[name] = f.metadata["production"]
    settings = Settings(**values)
    settings.validate()
    return settings, given
