"""``roomcast serve | publish | token | check-config | asyncapi | admin-hash | ...`` - the only
module that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from roomcast import config
from roomcast.app import Application
from roomcast.config import ConfigError, Settings
from roomcast.jsonbytes import BinaryMarkerError, decode_markers
from roomcast.runner import run

_AUTH_SETTINGS = (
    "jwt_secret",
    "jwt_public_key_file",
    "jwks_url",
    "jwt_algorithms",
    "jwt_issuer",
    "jwt_audience",
)


_URL_HELP = "gateway URL (default http://OPS_LISTEN, else http://HOST:PORT)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roomcast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    config.add_arguments(serve)

    check = sub.add_parser("check-config", help="validate and print the settings")
    config.add_arguments(check)

    token = sub.add_parser("token", help="print a client JWT signed with the configured secret")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument(
        "--rooms",
        nargs="*",
        default=[],
        help="room patterns it may join ('*': one segment, '**': one or more)",
    )
    token.add_argument("--publish", nargs="*", default=[], help="room patterns it may publish to")
    token.add_argument(
        "--ttl",
        type=int,
        default=3600,
        help="lifetime in seconds (0: no exp; servers refuse that unless --no-jwt-require-exp)",
    )
    config.add_arguments(token, only=_AUTH_SETTINGS)

    asyncapi = sub.add_parser(
        "asyncapi", help="write the AsyncAPI 3.0 document of the gateway's events (JSON)"
    )
    asyncapi.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    config.add_arguments(asyncapi, only=("host", "port", "app", "event_schemas", "upstream_events"))

    publish = sub.add_parser("publish", help="publish an event to a room")
    publish.add_argument("--room", required=True)
    publish.add_argument("--event", required=True)
    publish.add_argument(
        "--data", required=True, help='JSON value; {"$binary": "<base64>"} stands for bytes'
    )
    publish.add_argument("--idempotency-key", default=None)
    publish.add_argument("--namespace", default="/", help="the room's namespace (default /)")
    publish.add_argument(
        "--traceparent", default=None, help="W3C trace context the publication continues"
    )
    publish.add_argument("--url", default=None, help=_URL_HELP)
    config.add_arguments(
        publish,
        only=(
            "host",
            "port",
            "ops_listen",
            "api_key",
            "redis_url",
            "redis_prefix",
            "event_schemas",
            "tracing",
        ),
    )

    revoke = sub.add_parser(
        "revoke", help="revoke a user's tokens, or one token: its sockets are disconnected"
    )
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="revoke every token of this user issued until now")
    who.add_argument("--jti", help="revoke the token with this id (needs --exp)")
    revoke.add_argument("--exp", type=float, default=None, help="the token's exp (Unix seconds)")
    revoke.add_argument("--url", default=None, help=_URL_HELP)
    config.add_arguments(revoke, only=("host", "port", "ops_listen", "api_key"))

    admin_hash = sub.add_parser(
        "admin-hash",
        help="print the bcrypt hash of an Admin UI password (read from stdin, or asked for)",
    )
    admin_hash.add_argument(
        "--rounds", type=int, default=12, help="bcrypt cost: 2^rounds iterations (default 12)"
    )

    sockets = sub.add_parser("sockets", help="list the sockets of a room or a user, everywhere")
    which = sockets.add_mutually_exclusive_group(required=True)
    which.add_argument("--room")
    which.add_argument("--user")
    sockets.add_argument("--namespace", default="/")
    sockets.add_argument("--url", default=None, help=_URL_HELP)
    config.add_arguments(sockets, only=("host", "port", "ops_listen", "api_key"))
    return parser


def _settings(args: argparse.Namespace) -> tuple[Settings, frozenset[str]]:
    """The settings, and the names of those given by a flag, the environment or the file."""
    flags = {k: v for k, v in vars(args).items() if v is not None}
    return config.load_given(flags)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings, given = _settings(args)
        code = _COMMANDS[args.command](args, settings, given)
    except ConfigError as error:
        print(f"roomcast: configuration error: {error}", file=sys.stderr)
        code = 2
    except ValueError as error:
        print(f"roomcast: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _asyncapi(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    from roomcast.asyncapi import document
    from roomcast.node import load_schemas

    app = load_app(settings.app) if settings.app else None
    text = json.dumps(document(settings, app, load_schemas(settings, app)), indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def _check_config(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    from roomcast.node import load_schemas, make_authenticator
    from roomcast.tracing import check

    make_authenticator(settings)
    load_schemas(settings)
    check(settings.tracing)
    print(json.dumps(settings.redacted(), indent=2, default=list))
    return 0


def _token(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    from roomcast.node import make_authenticator

    auth = make_authenticator(settings)
    if auth is None:
        raise ConfigError(
            "jwt_secret is required to mint tokens (--jwt-secret or ROOMCAST_JWT_SECRET)"
        )
    ttl = args.ttl if args.ttl > 0 else None
    print(auth.mint(args.sub, args.rooms, args.publish, ttl_seconds=ttl))
    return 0


def _publish(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--data is not valid JSON: {exc}") from exc
    if settings.redis_url:  # the HTTP API reads {"$binary": ...} itself
        try:
            data = decode_markers(data)
        except BinaryMarkerError as exc:
            raise ConfigError(f"--data: {exc}") from None
        from roomcast import tracing

        tracing.setup(settings.tracing)  # the Publisher's span, when the OTEL_* variables ask
        try:
            result = asyncio.run(_publish_redis(settings, args, data))
        finally:
            tracing.shutdown()
        print(json.dumps(result))
        return 0
    body: dict[str, Any] = {"room": args.room, "event": args.event, "data": data}
    if args.namespace != "/":
        body["namespace"] = args.namespace
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    if args.traceparent:
        body["traceparent"] = args.traceparent
    return _api(args, settings, "POST", "/api/v1/publish", body)


def _revoke(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    if args.jti is not None and args.exp is None:
        raise ConfigError("--jti needs --exp, the token's exp claim")
    body = {"user": args.user} if args.user else {"jti": args.jti, "exp": args.exp}
    return _api(args, settings, "POST", "/api/v1/revoke", body)


def _sockets(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    query = {"room": args.room} if args.room else {"user": args.user}
    query["namespace"] = args.namespace
    return _api(args, settings, "GET", "/api/v1/sockets?" + urllib.parse.urlencode(query), None)


def _api(args: argparse.Namespace, settings: Settings, method: str, path: str, body: Any) -> int:
    """Call the gateway's HTTP API with the API key; print the answer; 0 on success."""
    url = (args.url or _api_base(settings)).rstrip("/") + path
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {settings.api_key}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as error:
        print(
            f"roomcast: {args.command} failed ({error.code}): {error.read().decode()}",
            file=sys.stderr,
        )
        return 1
    except urllib.error.URLError as error:
        print(f"roomcast: cannot reach {url}: {error.reason}", file=sys.stderr)
        return 1


async def _publish_redis(settings: Settings, args: argparse.Namespace, data: Any) -> dict[str, Any]:
    from roomcast.node import load_schemas
    from roomcast.publisher import Publisher

    publisher = Publisher.from_url(
        settings.redis_url, prefix=settings.redis_prefix, schemas=load_schemas(settings)
    )
    try:
        result = await publisher.publish(
            args.room,
            args.event,
            data,
            idempotency_key=args.idempotency_key,
            traceparent=args.traceparent,
            namespace=args.namespace,
        )
    finally:
        await publisher.close()
    return {"id": result.id, "offset": result.offset, "duplicate": result.duplicate}


def _api_base(settings: Settings) -> str:
    """Where the server APIs are: the ops listener when there is one, else the main port."""
    return f"http://{settings.ops_listen or f'{settings.host}:{settings.port}'}"


def _admin_hash(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    """The hash for ``--admin-password-hash``: the password from stdin (one line) when it is
    not a terminal, else asked for twice without echo."""
    import getpass

    import bcrypt

    if not 4 <= args.rounds <= 31:
        raise ConfigError(f"--rounds must be 4-31, got {args.rounds}")
    if sys.stdin.isatty():
        password = getpass.getpass("Admin UI password: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    secret = password.encode()
    if not secret:
        raise ConfigError("the password is empty")
    if len(secret) > 72:
        raise ConfigError("the password is longer than 72 bytes, which bcrypt cannot take")
    print(bcrypt.hashpw(secret, bcrypt.gensalt(args.rounds)).decode())
    return 0


def load_app(spec: str) -> Application:
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attribute, None)
    if not isinstance(app, Application):
        raise ConfigError(f"app {spec!r} is not a roomcast.Application")
    return app


def _serve(args: argparse.Namespace, settings: Settings, given: frozenset[str]) -> int:
    app = load_app(settings.app) if settings.app else None
    settings = _dev_defaults(settings, given)
    from roomcast.node import load_schemas, make_authenticator

    make_authenticator(settings)  # fail fast on bad key settings
    load_schemas(settings, app)  # and on a bad schema file
    from roomcast.tracing import check

    check(settings.tracing)  # and on tracing asked for without the otel extra
    if settings.workers > 1:
        from roomcast.logs import configure as configure_logs
        from roomcast.workers import run_workers

        configure_logs(settings.log_level, settings.log_format, settings.secret_values())
        code: int = run_workers(settings, app)
        return code
    run(settings, app)
    return 0


_DEV_QUICK_STOP = ("drain_delay_s", "drain_window_s")
"""Settings that are 0 in development mode unless given: no balancer waits for the drain."""


def _dev_defaults(settings: Settings, given: frozenset[str] = frozenset()) -> Settings:
    """Without a JWT key, generate development secrets and print how to use them; a stop
    (Ctrl-C) then tells clients to leave at once, unless the drain settings were given."""
    if (
        settings.production
        or settings.jwt_secret
        or settings.jwt_public_key_file
        or settings.jwks_url
    ):
        return settings
    import dataclasses

    settings = dataclasses.replace(
        settings,
        jwt_secret=secrets.token_urlsafe(48),
        api_key=settings.api_key or secrets.token_hex(24),  # never starts with "-"
    )
    quick: dict[str, Any] = {name: 0.0 for name in _DEV_QUICK_STOP if name not in given}
    settings = dataclasses.replace(settings, **quick)
    from roomcast.node import make_authenticator

    auth = make_authenticator(settings)
    assert auth is not None
    token = auth.mint("dev-user", ["**"], ["**"], ttl_seconds=24 * 3600)
    base = _api_base(settings)
    print(
        "=== DEVELOPMENT MODE: generated secrets, not for production ===\n"
        f"dev token (sub=dev-user, all rooms, 24 h):\n  {token}\n"
        f"publish:\n  curl -X POST {base}/api/v1/publish"
        f" -H 'Authorization: Bearer {settings.api_key}'"
        ' -H \'Content-Type: application/json\' -d \'{"room":"doc:1","event":"hello","data":{}}\'\n'
        "=================================================================",
        flush=True,
    )
    return settings


_COMMANDS = {
    "serve": _serve,
    "asyncapi": _asyncapi,
    "check-config": _check_config,
    "token": _token,
    "publish": _publish,
    "revoke": _revoke,
    "sockets": _sockets,
    "admin-hash": _admin_hash,
}
