"""Tests for roomcast.auth: real PyJWT, real keys, a real local JWKS server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from roomcast.auth import (
    ROOM_NAME_RE,
    Authenticator,
    AuthError,
    AuthSettings,
    InvalidRoomError,
    Principal,
    TokenExpiredError,
    TokenInvalidError,
    TokenMissingError,
    token_from_request,
    validate_room,
)

ISS = "roomcast"
AUD = "clients"
SECRET = "s" * 64  # long enough for HS512 (RFC 7518 section 3.2)
OTHER_SECRET = "o" * 64
ROOM_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-.@/"


# --------------------------------------------------------------------------- keys


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def rsa_pub_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "rsa.pub.pem"
    path.write_bytes(_public_pem(rsa_key))
    return str(path)


@pytest.fixture
def ec_pub_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> str:
    path = tmp_path / "ec.pub.pem"
    path.write_bytes(_public_pem(ec_key))
    return str(path)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "u1",
        "rooms": ["doc:42"],
        "iat": now,
        "exp": now + 60,
        "iss": ISS,
        "aud": AUD,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs(claims: dict[str, Any], alg: str = "HS256", secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _auth(**kwargs: Any) -> Authenticator:
    return Authenticator(AuthSettings(issuer=ISS, audience=AUD, **kwargs))


def _hs_auth(**kwargs: Any) -> Authenticator:
    return _auth(secret=SECRET, **kwargs)


# --------------------------------------------------------------------------- JWKS server


@dataclass
class JwksServer:
    url: str
    body: bytes
    status: int = 200
    requests: int = 0
    gate: threading.Event | None = None  # when set, each request waits for it
    arrived: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    jwk.update(kid="k1", use="sig", alg="RS256")
    state = JwksServer(url="", body=json.dumps({"keys": [jwk]}).encode())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.requests += 1
            state.arrived.set()
            if state.gate is not None:
                state.gate.wait(timeout=2)
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean; requests are counted above

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # bound and listening on return
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    # A short poll interval keeps shutdown() quick; the default makes teardown take 0.5 s.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="jwks-server"
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _rs(key: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str | None = "k1") -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, key, algorithm="RS256", headers=headers)


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_algorithms_accept_minted_token(alg: str) -> None:
    """A token minted with each HS algorithm authenticates to the principal it names."""
    auth = _auth(secret=SECRET, algorithms=(alg,))
    token = auth.mint("alice", ["doc:42", "team:7:*"], publish=["doc:42"], ttl_seconds=60)
    assert jwt.get_unverified_header(token)["alg"] == alg
    principal = await auth.authenticate(token)
    assert principal.user_id == "alice"
    assert principal.rooms == ("doc:42", "team:7:*")
    assert principal.publish == ("doc:42",)
    assert principal.expires_at is not None
    assert 0 < principal.expires_at - time.time() <= 60
    assert principal.claims["sub"] == "alice"


async def test_rs256_public_key_file(rsa_key: rsa.RSAPrivateKey, rsa_pub_file: str) -> None:
    """An RS256 token verifies against the RSA public key read from a PEM file."""
    auth = _auth(public_key_file=rsa_pub_file, algorithms=("RS256",))
    principal = await auth.authenticate(_rs(rsa_key, _claims(), kid=None))
    assert principal.user_id == "u1"
    assert principal.rooms == ("doc:42",)


async def test_es256_public_key_file(ec_key: ec.EllipticCurvePrivateKey, ec_pub_file: str) -> None:
    """An ES256 token verifies against the EC public key read from a PEM file."""
    auth = _auth(public_key_file=ec_pub_file, algorithms=("ES256",))
    principal = await auth.authenticate(jwt.encode(_claims(), ec_key, algorithm="ES256"))
    assert principal.user_id == "u1"


async def test_rs256_token_signed_by_other_key_is_invalid(rsa_pub_file: str) -> None:
    """An RS256 token signed by a different private key fails signature verification."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = _auth(public_key_file=rsa_pub_file, algorithms=("RS256",))
    with pytest.raises(TokenInvalidError, match="signature"):
        await auth.authenticate(_rs(other, _claims()))


async def test_hs256_forged_with_public_key_as_secret_is_invalid(
    rsa_key: rsa.RSAPrivateKey, rsa_pub_file: str
) -> None:
    """An HS256 token keyed with the public key PEM is rejected when both HS and RS are allowed."""
    auth = _auth(secret=SECRET, public_key_file=rsa_pub_file, algorithms=("HS256", "RS256"))
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(_public_pem(rsa_key), signing_input, hashlib.sha256).digest()
    with pytest.raises(TokenInvalidError, match="signature"):
        await auth.authenticate(f"{header}.{payload}.{_b64(sig)}")
    assert (await auth.authenticate(_rs(rsa_key, _claims()))).user_id == "u1"
    assert (await auth.authenticate(_hs(_claims()))).user_id == "u1"


async def test_jwks_keys_are_cached(rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer) -> None:
    """Keys fetched from the JWKS endpoint are reused: a second authenticate makes no request."""
    auth = _auth(jwks_url=jwks_server.url, algorithms=("RS256",))
    token = _rs(rsa_key, _claims())
    assert (await auth.authenticate(token)).user_id == "u1"
    assert jwks_server.requests == 1
    assert (await auth.authenticate(_rs(rsa_key, _claims(sub="u2")))).user_id == "u2"
    assert jwks_server.requests == 1


async def test_jwks_concurrent_first_use_fetches_once(
    rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer
) -> None:
    """Concurrent first authentications share one JWKS fetch."""
    auth = _auth(jwks_url=jwks_server.url, algorithms=("RS256",))
    tokens = [_rs(rsa_key, _claims(sub=f"u{i}")) for i in range(5)]
    principals = await asyncio.gather(*(auth.authenticate(t) for t in tokens))
    assert [p.user_id for p in principals] == [f"u{i}" for i in range(5)]
    assert jwks_server.requests == 1


async def test_jwks_fetch_does_not_block_event_loop(
    rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer
) -> None:
    """While the JWKS request is in flight the event loop keeps running other work."""
    jwks_server.gate = threading.Event()
    auth = _auth(jwks_url=jwks_server.url, algorithms=("RS256",))
    task = asyncio.create_task(auth.authenticate(_rs(rsa_key, _claims())), name="authenticate")
    # A blocking fetch would finish the task (after the gate's 2 s timeout) before this returns.
    assert await asyncio.to_thread(jwks_server.arrived.wait, 2)
    assert not task.done()
    jwks_server.gate.set()
    assert (await task).user_id == "u1"


@pytest.mark.parametrize(
    ("status", "body"),
    [(503, b"unavailable"), (200, b"<html>not json</html>")],
    ids=["http-error", "not-json"],
)
async def test_jwks_fetch_failure_is_invalid(
    rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer, status: int, body: bytes
) -> None:
    """A JWKS endpoint that errors or returns garbage makes the token invalid, not a crash."""
    jwks_server.status, jwks_server.body = status, body
    auth = _auth(jwks_url=jwks_server.url, algorithms=("RS256",))
    with pytest.raises(TokenInvalidError, match=r"^cannot fetch signing keys: "):
        await auth.authenticate(_rs(rsa_key, _claims()))


@pytest.mark.parametrize(
    ("kid", "message"),
    [("nope", "no usable signing key for kid 'nope'"), (None, "token header has no kid")],
)
async def test_jwks_unknown_or_missing_kid_is_invalid(
    rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer, kid: str | None, message: str
) -> None:
    """A token whose kid is absent or not in the JWKS is invalid."""
    auth = _auth(jwks_url=jwks_server.url, algorithms=("RS256",))
    with pytest.raises(TokenInvalidError, match=message):
        await auth.authenticate(_rs(rsa_key, _claims(), kid=kid))


async def test_a_token_without_exp_is_invalid_unless_allowed() -> None:
    """A token with no exp claim would never expire: it is refused by default, and accepted
    only with require_exp=False."""
    token = _hs_auth().mint("bob", ["doc:*"], ttl_seconds=None)
    with pytest.raises(TokenInvalidError, match="token has no exp claim"):
        await _hs_auth().authenticate(token)
    assert (await _hs_auth(require_exp=False).authenticate(token)).expires_at is None


async def test_mint_sets_issuer_audience_and_optional_expiry() -> None:
    """mint() adds the configured iss and aud, and omits exp when ttl_seconds is None."""
    auth = _hs_auth(require_exp=False)
    token = auth.mint("bob", ["doc:*"], ttl_seconds=None, extra={"name": "Bob"})
    principal = await auth.authenticate(token)
    assert principal.expires_at is None
    assert principal.publish == ()
    assert principal.claims["iss"] == ISS
    assert principal.claims["aud"] == AUD
    assert principal.claims["name"] == "Bob"


async def test_rooms_claims_default_to_empty() -> None:
    """A token without rooms or publish claims grants nothing."""
    principal = await _hs_auth().authenticate(_hs(_claims(rooms=None)))
    assert principal.rooms == ()
    assert principal.publish == ()
    assert not principal.may_join("doc:42")


async def test_leeway_accepts_recently_expired_token() -> None:
    """A token expired a few seconds ago is accepted within the configured leeway."""
    token = _hs(_claims(exp=int(time.time()) - 5))
    assert (await _hs_auth(leeway_seconds=30).authenticate(token)).user_id == "u1"


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("token", [None, ""])
async def test_missing_token(token: str | None) -> None:
    """No token, or an empty one, is token_missing."""
    with pytest.raises(TokenMissingError) as info:
        await _hs_auth().authenticate(token)
    assert info.value.code == "token_missing"


async def test_expired_token() -> None:
    """An expired token is token_expired and the message names the expiry time."""
    token = _hs(_claims(iat=999_999_000, exp=1_000_000_000))
    with pytest.raises(TokenExpiredError) as info:
        await _hs_auth().authenticate(token)
    assert info.value.code == "token_expired"
    assert str(info.value) == "token expired at 2001-09-09T01:46:40+00:00"
    assert isinstance(info.value, AuthError)


def _none_alg_token() -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(_claims()).encode())}."


INVALID_CASES: list[tuple[str, Any, str]] = [
    ("nbf-future", lambda: _hs(_claims(nbf=int(time.time()) + 600)), "token not valid yet"),
    ("iat-future", lambda: _hs(_claims(iat=int(time.time()) + 600)), "token not valid yet"),
    ("wrong-iss", lambda: _hs(_claims(iss="evil")), "issuer 'evil' not accepted"),
    ("missing-iss", lambda: _hs(_claims(iss=None)), "token has no iss claim"),
    ("wrong-aud", lambda: _hs(_claims(aud="x")), "audience 'x' not accepted"),
    ("missing-aud", lambda: _hs(_claims(aud=None)), "token has no aud claim"),
    ("bad-signature", lambda: _hs(_claims(), secret=OTHER_SECRET), "signature does not verify"),
    ("alg-none", _none_alg_token, "algorithm 'none' not allowed"),
    ("alg-not-allowed", lambda: _hs(_claims(), alg="HS512"), "algorithm 'HS512' not allowed"),
    ("missing-sub", lambda: _hs(_claims(sub=None)), "token has no sub claim"),
    ("empty-sub", lambda: _hs(_claims(sub="")), "sub claim must be a non-empty string"),
    ("sub-not-str", lambda: _hs(_claims(sub=7)), "sub claim must be a non-empty string, got 7"),
    ("rooms-not-list", lambda: _hs(_claims(rooms="doc:42")), "rooms claim must be a list"),
    ("rooms-item-int", lambda: _hs(_claims(rooms=["a", 1])), "rooms claim must hold only"),
    ("publish-not-list", lambda: _hs(_claims(publish={"a": 1})), "publish claim must be a list"),
    ("exp-not-number", lambda: _hs(_claims(exp="soon")), r"exp\) must be an integer"),
    ("garbage", lambda: "not-a-jwt", "malformed token"),
    ("bad-payload", lambda: "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "malformed token"),
]


@pytest.mark.parametrize(
    ("make_token", "message"),
    [(make, message) for _, make, message in INVALID_CASES],
    ids=[case_id for case_id, _, _ in INVALID_CASES],
)
async def test_invalid_tokens(make_token: Any, message: str) -> None:
    """Each kind of bad token is token_invalid with a message saying what is wrong."""
    auth = _hs_auth()
    token = make_token()
    with pytest.raises(TokenInvalidError, match=message) as info:
        await auth.authenticate(token)
    assert info.value.code == "token_invalid"


async def test_audience_in_token_without_configured_audience_is_invalid() -> None:
    """A token that names an audience is rejected by an authenticator that expects none."""
    auth = Authenticator(AuthSettings(secret=SECRET))
    with pytest.raises(TokenInvalidError, match="audience 'clients' not accepted"):
        await auth.authenticate(_hs(_claims()))
    assert (await auth.authenticate(_hs(_claims(aud=None, iss=None)))).user_id == "u1"


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("algorithms", [("none",), ("HS256", "none"), ("NONE",), ("None",)])
def test_settings_reject_none_algorithm(algorithms: tuple[str, ...]) -> None:
    """AuthSettings refuses "none" in any spelling, even beside a real algorithm."""
    with pytest.raises(ValueError, match=r"algorithm '(?i:none)' in algorithms is never accepted"):
        AuthSettings(secret=SECRET, algorithms=algorithms)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithms": ()}, "at least one algorithm"),
        ({"algorithms": ("HS257",)}, "unknown algorithm 'HS257'"),
        ({"algorithms": "HS256"}, "not the string 'HS256'"),
        ({"secret": ""}, "secret must not be empty"),
        ({"jwks_cache_seconds": 0}, "jwks_cache_seconds must be > 0"),
        ({"leeway_seconds": -1.0}, "leeway_seconds must be a finite number >= 0"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, Any], message: str) -> None:
    """AuthSettings names the bad field and value at construction."""
    with pytest.raises(ValueError, match=message):
        AuthSettings(**kwargs)


def test_settings_are_frozen() -> None:
    """AuthSettings cannot be changed after construction."""
    auth_settings = AuthSettings(secret=SECRET)
    with pytest.raises(AttributeError):
        auth_settings.secret = "x"  # type: ignore[misc]


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_authenticator_rejects_inconsistent_settings(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_pub_file: str, ec_pub_file: str
) -> None:
    """Authenticator refuses settings that could never verify a token, saying why."""
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cases: list[tuple[AuthSettings, str]] = [
        (AuthSettings(), "no key source"),
        (AuthSettings(public_key_file=rsa_pub_file), r"algorithms \['HS256'\] need a secret"),
        (AuthSettings(secret=SECRET, algorithms=("RS256",)), "secret is set but algorithms"),
        (
            AuthSettings(secret=SECRET, algorithms=("HS256", "RS256")),
            "need public_key_file or jwks_url",
        ),
        (
            AuthSettings(public_key_file=rsa_pub_file, jwks_url="http://x/", algorithms=("RS256",)),
            "only one of public_key_file and jwks_url",
        ),
        (AuthSettings(secret="short"), "secret is too short for HS256"),
        (AuthSettings(secret="s" * 32, algorithms=("HS512",)), "secret is too short for HS512"),
        (
            AuthSettings(public_key_file=str(tmp_path / "absent.pem"), algorithms=("RS256",)),
            "cannot read public_key_file",
        ),
        (
            AuthSettings(
                public_key_file=_write(tmp_path, "priv.pem", private_pem), algorithms=("RS256",)
            ),
            "holds a private key",
        ),
        (
            AuthSettings(public_key_file=rsa_pub_file, algorithms=("ES256",)),
            "holds no key usable for ES256",
        ),
        (
            AuthSettings(public_key_file=ec_pub_file, algorithms=("ES384",)),
            "holds no key usable for ES384",
        ),
        (
            AuthSettings(jwks_url="file:///etc/passwd", algorithms=("RS256",)),
            "jwks_url 'file:///etc/passwd' is not usable",
        ),
    ]
    for auth_settings, message in cases:
        with pytest.raises(ValueError, match=message):
            Authenticator(auth_settings)


def test_mint_rejects_bad_arguments(rsa_pub_file: str) -> None:
    """mint() needs a secret and refuses arguments that would make a wrong token."""
    rs_only = _auth(public_key_file=rsa_pub_file, algorithms=("RS256",))
    with pytest.raises(ValueError, match="mint needs a secret"):
        rs_only.mint("u1", ["doc:1"])
    auth = _hs_auth()
    with pytest.raises(ValueError, match="sub must be a non-empty string"):
        auth.mint("", ["doc:1"])
    with pytest.raises(ValueError, match="rooms must be a sequence of strings"):
        auth.mint("u1", "doc:1")
    with pytest.raises(ValueError, match="ttl_seconds must be > 0"):
        auth.mint("u1", ["doc:1"], ttl_seconds=0)
    with pytest.raises(ValueError, match="extra must not set exp, sub"):
        auth.mint("u1", ["doc:1"], extra={"sub": "admin", "exp": 1})


def test_mint_uses_first_hmac_algorithm(rsa_pub_file: str) -> None:
    """mint() signs with the first HS algorithm in the allow-list."""
    auth = _auth(
        secret=SECRET, public_key_file=rsa_pub_file, algorithms=("RS256", "HS384", "HS256")
    )
    assert jwt.get_unverified_header(auth.mint("u1", []))["alg"] == "HS384"


# --------------------------------------------------------------------------- rooms


@pytest.mark.parametrize(
    "room",
    ["a", "doc:42", "team:7:general", "user@example.com/inbox", "A-b_c.d", "9" * 256],
)
def test_validate_room_accepts(room: str) -> None:
    """Names of 1-256 letters, digits and ':_-.@/' are returned unchanged."""
    assert validate_room(room) == room


@pytest.mark.parametrize(
    ("room", "message"),
    [
        ("x" * 257, "longer than 256"),
        ("", "must not be empty"),
        ("doc 42", "'doc 42': only letters"),
        (" doc", "only letters"),
        ("doc\n", "only letters"),
        ("caf\u00e9", "only letters"),
        ("doc*", "only letters"),
        (5, "invalid room 5: must be a string"),
        (None, "invalid room None: must be a string"),
        (["a"], r"invalid room \['a'\]: must be a string"),
        (b"doc", "must be a string"),
    ],
)
def test_validate_room_rejects(room: object, message: str) -> None:
    """Bad room names raise InvalidRoomError naming the value."""
    with pytest.raises(InvalidRoomError, match=message) as info:
        validate_room(room)
    assert info.value.code == "invalid_room"
    assert isinstance(info.value, ValueError)


def test_invalid_room_message_is_truncated() -> None:
    """A huge bad value is cut short in the message."""
    with pytest.raises(InvalidRoomError) as info:
        validate_room("x" * 10_000)
    assert len(str(info.value)) < 120


@settings(max_examples=60, database=None, deadline=None)
@given(st.text(alphabet=ROOM_ALPHABET, min_size=1, max_size=256), st.text(min_size=1, max_size=3))
def test_validate_room_property(good: str, extra: str) -> None:
    """Every name over the allowed alphabet passes, and adding any other character fails."""
    assert validate_room(good) == good
    assert ROOM_NAME_RE.match(good)
    if any(c not in ROOM_ALPHABET for c in extra):
        with pytest.raises(InvalidRoomError):
            validate_room(good[:250] + extra)


def _principal(rooms: tuple[str, ...], publish: tuple[str, ...] = ()) -> Principal:
    return Principal(user_id="u", rooms=rooms, publish=publish, expires_at=None, claims={})


# (pattern, room, granted): one table for the whole pattern language.
PATTERN_TABLE = [
    # exact names
    ("doc:42", "doc:42", True),
    ("doc:42", "doc:420", False),
    ("doc:42", "doc:4", False),
    ("doc:42", "Doc:42", False),
    # '*' is exactly one non-empty segment
    ("team:7:*", "team:7:general", True),
    ("team:7:*", "team:7:a:b", False),
    ("team:7:*", "team:7", False),
    ("team:7:*", "team:7:", False),
    ("team:7:*", "team:70:general", False),
    ("team:7:*", "Team:7:general", False),
    ("*", "lobby", True),
    ("*", "doc:1", False),
    ("*:1", "doc:1", True),
    ("*:1", "doc:2", False),
    ("doc:*:edit", "doc:9:edit", True),
    ("doc:*:edit", "doc:9:x:edit", False),
    ("*:*", "a:b", True),
    ("*:*", "a:b:c", False),
    # '**' is one or more non-empty segments, never zero
    ("team:7:**", "team:7:general", True),
    ("team:7:**", "team:7:a:b", True),
    ("team:7:**", "team:7:a:b:c:d", True),
    ("team:7:**", "team:7", False),
    ("team:7:**", "team:7:", False),
    ("team:7:**", "team:7::b", False),
    ("team:7:**", "team:8:a", False),
    ("**", "lobby", True),
    ("**", "a:b:c", True),
    ("**", "a::c", False),
    ("org:**:admin", "org:1:admin", True),
    ("org:**:admin", "org:1:2:3:admin", True),
    ("org:**:admin", "org:admin", False),
    ("org:**:admin", "org:1:admin:x", False),
    ("**:**", "a", False),
    ("**:**", "a:b", True),
    ("**:x:**", "a:x:b", True),
    ("**:x:**", "a:b:x:c:d", True),
    ("**:x:**", "x:a", False),
    # nothing else is special: these are literal characters no room name can hold
    ("doc:4*", "doc:42", False),
    ("doc*", "doc:1", False),
    ("doc:?", "doc:1", False),
    ("doc:[0-9]", "doc:1", False),
    ("doc:***", "doc:1", False),
    # literal segments, empty ones included, match exactly
    ("a::b", "a::b", True),
    ("a:*:b", "a::b", False),
    # a room that is not a valid name is never granted
    ("**", "bad room", False),
    ("**", "", False),
    ("*", "x" * 257, False),
]


@pytest.mark.parametrize(("pattern", "room", "granted"), PATTERN_TABLE)
def test_room_patterns(pattern: str, room: str, granted: bool) -> None:
    """A pattern grants a room when its segments match: '*' one, '**' one or more."""
    principal = _principal((pattern,), (pattern,))
    assert principal.may_join(room) is granted
    assert principal.may_publish(room) is granted


def test_room_patterns_with_many_double_stars() -> None:
    """Forty '**' against a room of 128 segments is decided by segments (no backtracking)."""
    room = ":".join(["a"] * 128)[:255]
    pattern = ":".join(["**"] * 40 + ["b"])
    assert not _principal((pattern,)).may_join(room)
    assert _principal((pattern.removesuffix(":b"),)).may_join(room)


NOTHING_GRANTED = {
    "doc:4*": "only as a whole",
    "doc*": "only as a whole",
    "doc:***": "only as a whole",
    "doc:[0-9]": "'[' cannot appear",
    "doc:?": "'?' cannot appear",
    "": "grants nothing",
}


@pytest.mark.parametrize(("pattern", "problem"), NOTHING_GRANTED.items())
def test_mint_refuses_patterns_that_grant_nothing(pattern: str, problem: str) -> None:
    """A pattern that can match no room name is refused where a token is minted."""
    with pytest.raises(ValueError, match=re.escape(problem)):
        _hs_auth().mint("u", rooms=["doc:1", pattern])
    with pytest.raises(ValueError, match="publish: pattern"):
        _hs_auth().mint("u", rooms=[], publish=[pattern])


def test_mint_accepts_every_other_pattern_in_the_table() -> None:
    """Every pattern of the table except those that grant nothing is one that mint accepts."""
    writable = {pattern for pattern, _, _ in PATTERN_TABLE} - set(NOTHING_GRANTED)
    for pattern in sorted(writable):
        assert _hs_auth().mint("u", rooms=[pattern])


def test_may_publish_uses_publish_patterns() -> None:
    """may_publish checks the publish patterns, not the rooms patterns."""
    principal = _principal(rooms=("doc:*",), publish=("doc:42",))
    assert principal.may_join("doc:1")
    assert not principal.may_publish("doc:1")
    assert principal.may_publish("doc:42")


# --------------------------------------------------------------------------- request


@pytest.mark.parametrize(
    ("auth_payload", "headers", "query", "expected"),
    [
        ({"token": "a"}, {"authorization": "Bearer h"}, {"token": "q"}, "a"),
        (None, {"authorization": "Bearer h"}, {"token": "q"}, "h"),
        ({"token": ""}, {"authorization": "bearer  h "}, {"token": "q"}, "h"),
        ({"token": 5}, {"authorization": "BEARER h"}, {}, "h"),
        ("a-string", {"authorization": "Basic dXNlcjpwdw=="}, {"token": "q"}, "q"),
        ([{"token": "a"}], {"authorization": "Bearer"}, {"token": "q"}, "q"),
        ({}, {}, {"token": "q"}, "q"),
        ({}, {}, {"token": ""}, None),
        (None, {}, {}, None),
    ],
)
def test_token_from_request_precedence(
    auth_payload: object, headers: dict[str, str], query: dict[str, str], expected: str | None
) -> None:
    """The CONNECT auth token wins over a Bearer header, which wins over the query string."""
    assert token_from_request(auth_payload, headers, query) == expected


async def test_verified_token_cache_still_honours_expiry() -> None:
    """A token verified once is served from the cache, and refused once it has expired."""
    authenticator = Authenticator(AuthSettings(secret="k" * 40))
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 2}, "k" * 40, algorithm="HS256")
    first = await authenticator.authenticate(token)
    assert await authenticator.authenticate(token) is first
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            await authenticator.authenticate(token)
        except TokenExpiredError:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("an expired token was still accepted from the cache")
