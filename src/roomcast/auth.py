"""JWT authentication: a token becomes a :class:`Principal`, or a distinct :class:`AuthError`.

Standalone: imports only the standard library and PyJWT. The key for each token is chosen
from its header ``alg`` after that ``alg`` has passed the allow-list, so an HMAC secret is
never tried against an RS/ES token and a public key is never used as an HMAC secret.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import types
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import jwt
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from roomcast.patterns import matches, pattern_problem

VERIFIED_CACHE_SIZE = 10_000
VERIFIED_CACHE_SECONDS = 60.0

__all__ = [
    "ROOM_NAME_RE",
    "AuthError",
    "AuthSettings",
    "Authenticator",
    "InvalidRoomError",
    "Principal",
    "TokenExpiredError",
    "TokenInvalidError",
    "TokenMissingError",
    "token_from_request",
    "validate_room",
]

ROOM_NAME_MAX_LENGTH = 256
ROOM_NAME_RE = re.compile(r"\A[A-Za-z0-9:_.@/-]{1,256}\Z")

# Every algorithm PyJWT knows except "none", which is never accepted.
_KNOWN_ALGORITHMS = frozenset(name for name in get_default_algorithms() if name != "none")
_JWKS_TIMEOUT_SECONDS = 5.0
_SHOW_LIMIT = 60
# Claims that mint() sets itself; `extra` may not override them.
_MINTED_CLAIMS = frozenset({"sub", "rooms", "publish", "iat", "exp", "iss", "aud"})


def _show(value: object) -> str:
    """Return ``repr(value)`` cut to a length that is safe to put in a message."""
    text = repr(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 3] + "..."
    return text


def _detail(exc: BaseException) -> str:
    """Return a library exception's text, lower-cased at the start and without a final dot."""
    text = str(exc).strip().rstrip(".")
    if len(text) > 200:
        text = text[:197] + "..."
    return text[:1].lower() + text[1:]


# --------------------------------------------------------------------------- errors


class AuthError(Exception):
    """A connection could not be authenticated; ``code`` is the wire-level reason."""

    code: ClassVar[str] = "auth_failed"


class TokenMissingError(AuthError):
    """No token was given."""

    code: ClassVar[str] = "token_missing"


class TokenInvalidError(AuthError):
    """The token is malformed, badly signed, or carries unacceptable claims."""

    code: ClassVar[str] = "token_invalid"


class TokenExpiredError(AuthError):
    """The token was valid but its ``exp`` has passed; the client should get a fresh one."""

    code: ClassVar[str] = "token_expired"


class InvalidRoomError(ValueError):
    """A room name is not a string of 1-256 letters, digits and ``:_-.@/``."""

    code: ClassVar[str] = "invalid_room"


# --------------------------------------------------------------------------- rooms


def validate_room(room: object) -> str:
    """Return ``room`` if it is a valid room name, else raise :class:`InvalidRoomError`."""
    if not isinstance(room, str):
        raise InvalidRoomError(f"invalid room {_show(room)}: must be a string")
    if not room:
        raise InvalidRoomError("invalid room '': must not be empty")
    if len(room) > ROOM_NAME_MAX_LENGTH:
        raise InvalidRoomError(
            f"invalid room {_show(room)}: longer than {ROOM_NAME_MAX_LENGTH} characters"
        )
    if ROOM_NAME_RE.match(room) is None:
        raise InvalidRoomError(
            f"invalid room {_show(room)}: only letters, digits and ':_-.@/' are allowed"
        )
    return room


# --------------------------------------------------------------------------- principal


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is and which rooms it may join and publish to."""

    user_id: str
    rooms: tuple[str, ...]
    publish: tuple[str, ...]
    expires_at: float | None
    claims: Mapping[str, Any] = field(hash=False)

    def may_join(self, room: str) -> bool:
        """Return whether ``room`` is a valid name matched by a pattern in ``rooms``."""
        return _matches_any(room, self.rooms)

    def may_publish(self, room: str) -> bool:
        """Return whether ``room`` is a valid name matched by a pattern in ``publish``."""
        return _matches_any(room, self.publish)


def _matches_any(room: str, patterns: tuple[str, ...]) -> bool:
    # ``*`` is one segment, ``**`` one or more (roomcast.patterns); an invalid name is never
    # granted, whatever the patterns say.
    if not isinstance(room, str) or ROOM_NAME_RE.match(room) is None:
        return False
    return any(matches(room, pattern) for pattern in patterns)


def _pattern_claim(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TokenInvalidError(f"{name} claim must be a list of strings, got {_show(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TokenInvalidError(f"{name} claim must hold only strings, got {_show(item)}")
    return tuple(value)


def _principal_from_claims(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenInvalidError(f"sub claim must be a non-empty string, got {_show(sub)}")
    exp = claims.get("exp")
    expires_at: float | None
    if exp is None:
        expires_at = None
    elif isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp):
        expires_at = float(exp)
    else:
        raise TokenInvalidError(f"exp claim must be a number, got {_show(exp)}")
    return Principal(
        user_id=sub,
        rooms=_pattern_claim(claims, "rooms"),
        publish=_pattern_claim(claims, "publish"),
        expires_at=expires_at,
        claims=types.MappingProxyType(claims),
    )


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Where verification keys come from and which claims are required."""

    secret: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    jwks_cache_seconds: int = 300
    algorithms: tuple[str, ...] = ("HS256",)
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: float = 0.0
    require_exp: bool = True
    """Refuse tokens without ``exp``: such a token would be valid forever."""

    def __post_init__(self) -> None:
        if isinstance(self.algorithms, str):
            raise ValueError(
                f"algorithms must be a sequence of names, not the string {_show(self.algorithms)}"
            )
        algorithms = tuple(self.algorithms)
        object.__setattr__(self, "algorithms", algorithms)
        if not algorithms:
            raise ValueError("algorithms must name at least one algorithm")
        for name in algorithms:
            if isinstance(name, str) and name.lower() == "none":
                raise ValueError(
                    f"algorithm {name!r} in algorithms is never accepted: unsigned tokens "
                    "are rejected; remove it"
                )
            if name not in _KNOWN_ALGORITHMS:
                raise ValueError(
                    f"unknown algorithm {_show(name)} in algorithms; "
                    f"known: {', '.join(sorted(_KNOWN_ALGORITHMS))}"
                )
        if self.secret == "":
            raise ValueError("secret must not be empty; leave it unset instead")
        if self.public_key_file == "":
            raise ValueError("public_key_file must not be empty; leave it unset instead")
        if self.jwks_url == "":
            raise ValueError("jwks_url must not be empty; leave it unset instead")
        if self.jwks_cache_seconds <= 0:
            raise ValueError(f"jwks_cache_seconds must be > 0, got {self.jwks_cache_seconds!r}")
        if not math.isfinite(self.leeway_seconds) or self.leeway_seconds < 0:
            raise ValueError(
                f"leeway_seconds must be a finite number >= 0, got {self.leeway_seconds!r}"
            )


# --------------------------------------------------------------------------- authenticator


def _is_hmac(algorithm: str) -> bool:
    return algorithm.startswith("HS")


class Authenticator:
    """Verifies tokens against :class:`AuthSettings` and turns them into principals."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._leeway = settings.leeway_seconds
        self._hmac_algs = [a for a in settings.algorithms if _is_hmac(a)]
        self._hmac_only = len(self._hmac_algs) == len(settings.algorithms)
        algorithms = settings.algorithms
        hmac_algs = [a for a in algorithms if _is_hmac(a)]
        asym_algs = [a for a in algorithms if not _is_hmac(a)]
        has_public = settings.public_key_file is not None or settings.jwks_url is not None

        if settings.secret is None and not has_public:
            raise ValueError("no key source: set secret, public_key_file or jwks_url")
        if hmac_algs and settings.secret is None:
            raise ValueError(f"algorithms {hmac_algs} need a secret, and secret is not set")
        if settings.secret is not None and not hmac_algs:
            raise ValueError(
                f"secret is set but algorithms {list(algorithms)} has no HS256/HS384/HS512"
            )
        if asym_algs and not has_public:
            raise ValueError(f"algorithms {asym_algs} need public_key_file or jwks_url")
        if has_public and not asym_algs:
            raise ValueError(
                f"public_key_file or jwks_url is set but algorithms {list(algorithms)} "
                "has no RS/PS/ES/EdDSA algorithm"
            )
        if settings.public_key_file is not None and settings.jwks_url is not None:
            raise ValueError("set only one of public_key_file and jwks_url")

        self._secret: bytes | None = None
        if settings.secret is not None:
            self._secret = settings.secret.encode("utf-8")
            for alg in hmac_algs:
                weak = get_default_algorithms()[alg].check_key_length(self._secret)
                if weak is not None:
                    raise ValueError(
                        f"secret is too short for {alg}: {len(self._secret)} bytes, "
                        "see RFC 7518 section 3.2 for the minimum"
                    )

        self._public_keys: dict[str, Any] = {}
        if settings.public_key_file is not None:
            self._public_keys = _load_public_keys(settings.public_key_file, asym_algs)

        self._verified: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        """Recently verified tokens (a reconnect storm presents the same tokens again)."""
        self._jwks: jwt.PyJWKClient | None = None
        if settings.jwks_url is not None:
            try:
                self._jwks = jwt.PyJWKClient(
                    settings.jwks_url,
                    cache_jwk_set=True,
                    lifespan=settings.jwks_cache_seconds,
                    timeout=_JWKS_TIMEOUT_SECONDS,
                )
            except jwt.PyJWKClientError as exc:
                raise ValueError(
                    f"jwks_url {_show(settings.jwks_url)} is not usable: {_detail(exc)}"
                ) from exc

    @property
    def settings(self) -> AuthSettings:
        return self._settings

    async def authenticate(self, token: str | None) -> Principal:
        """Verify ``token`` and return its principal, or raise an :class:`AuthError`."""
        if token is None or token == "":
            raise TokenMissingError("no token given")
        if not isinstance(token, str):
            raise TokenInvalidError(f"token must be a string, got {type(token).__name__}")
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None:
            until, principal = cached
            if now < until:
                return principal
            del self._verified[token]  # verified again below: expired tokens fail there
        principal = await self._verify(token)
        self._remember(token, principal, now)
        return principal

    def _remember(self, token: str, principal: Principal, now: float) -> None:
        """Cache a verified token until it expires, and at most ``VERIFIED_CACHE_SECONDS``
        (so a key removed from a JWKS stops being honoured soon)."""
        until = now + VERIFIED_CACHE_SECONDS
        if principal.expires_at is not None:
            until = min(until, principal.expires_at + self._leeway)
        self._verified[token] = (until, principal)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)

    async def _verify(self, token: str) -> Principal:
        if self._hmac_only:
            # One key for every allowed algorithm: no need to parse the header first.
            return _principal_from_claims(self._decode(token, self._secret, self._hmac_algs))
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenInvalidError(f"malformed token: {_detail(exc)}") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.algorithms:
            raise TokenInvalidError(f"token algorithm {_show(alg)} not allowed")

        key = await self._key_for(alg, token, header)
        claims = self._decode(token, key, [alg])
        return _principal_from_claims(claims)

    async def _key_for(self, alg: str, token: str, header: Mapping[str, Any]) -> Any:
        if _is_hmac(alg):
            return self._secret
        if self._jwks is None:
            return self._public_keys[alg]
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenInvalidError("token header has no kid to pick a signing key")
        try:
            # PyJWKClient does blocking HTTP; its own lock and cache make it thread-safe.
            return await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenInvalidError(f"cannot fetch signing keys: {_detail(exc)}") from exc
        except jwt.DecodeError as exc:
            raise TokenInvalidError(f"malformed token: {_detail(exc)}") from exc
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise TokenInvalidError(f"no usable signing key for kid {_show(kid)}") from exc
        except (ValueError, OSError) as exc:
            # Not JSON, not UTF-8, or the connection died while reading the body.
            raise TokenInvalidError(f"cannot fetch signing keys: {_detail(exc)}") from exc

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> dict[str, Any]:
        settings = self._settings
        try:
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=settings.issuer,
                audience=settings.audience,
                leeway=settings.leeway_seconds,
                options={
                    "require": ["sub", "exp"] if settings.require_exp else ["sub"],
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpiredError(_expired_message(token)) from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenInvalidError("token not valid yet") from exc
        except jwt.InvalidIssuerError as exc:
            iss = _unverified_claims(token).get("iss")
            raise TokenInvalidError(f"token issuer {_show(iss)} not accepted") from exc
        except jwt.InvalidAudienceError as exc:
            aud = _unverified_claims(token).get("aud")
            raise TokenInvalidError(f"token audience {_show(aud)} not accepted") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalidError(f"token has no {exc.claim} claim") from exc
        except InvalidSubjectError as exc:
            sub = _unverified_claims(token).get("sub")
            raise TokenInvalidError(
                f"sub claim must be a non-empty string, got {_show(sub)}"
            ) from exc
        except jwt.InvalidIssuedAtError as exc:
            raise TokenInvalidError("iat claim must be a number") from exc
        except InvalidJTIError as exc:
            raise TokenInvalidError("jti claim must be a string") from exc
        except jwt.InvalidAlgorithmError as exc:
            alg = jwt.get_unverified_header(token).get("alg")  # parsed fine a moment ago
            if alg not in algorithms:
                raise TokenInvalidError(f"token algorithm {_show(alg)} not allowed") from exc
            raise TokenInvalidError(f"token algorithm not usable: {_detail(exc)}") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenInvalidError("token signature does not verify") from exc
        except jwt.DecodeError as exc:
            # PyJWT's parse errors ("Expiration Time claim (exp) must be an integer") hold no
            # case-sensitive values, so they can be lower-cased whole.
            raise TokenInvalidError(f"malformed token: {_detail(exc).lower()}") from exc
        except jwt.InvalidKeyError as exc:
            raise TokenInvalidError(f"signing key not usable: {_detail(exc)}") from exc
        except jwt.InvalidTokenError as exc:
            # Any other rejection PyJWT adds later is still a rejection, with its reason.
            raise TokenInvalidError(f"invalid token: {_detail(exc)}") from exc

    def mint(
        self,
        sub: str,
        rooms: Sequence[str],
        publish: Sequence[str] = (),
        ttl_seconds: int | None = 3600,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign a token with the shared secret and the first HS* algorithm in the allow-list."""
        if self._secret is None:
            raise ValueError("mint needs a secret, and secret is not set")
        alg = next(a for a in self._settings.algorithms if _is_hmac(a))
        if not isinstance(sub, str) or not sub:
            raise ValueError(f"sub must be a non-empty string, got {_show(sub)}")
        for name, patterns in (("rooms", rooms), ("publish", publish)):
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{name} must be a sequence of strings, got {_show(patterns)}")
            for pattern in patterns:
                problem = pattern_problem(pattern)
                if problem is not None:
                    raise ValueError(f"{name}: {problem}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0 or None, got {ttl_seconds!r}")
        payload: dict[str, Any] = dict(extra or {})
        clash = sorted(_MINTED_CLAIMS.intersection(payload))
        if clash:
            raise ValueError(f"extra must not set {', '.join(clash)}; use the parameters")
        now = int(time.time())
        payload.update(sub=sub, rooms=list(rooms), publish=list(publish), iat=now)
        if ttl_seconds is not None:
            payload["exp"] = now + ttl_seconds
        if self._settings.issuer is not None:
            payload["iss"] = self._settings.issuer
        if self._settings.audience is not None:
            payload["aud"] = self._settings.audience
        return jwt.encode(payload, self._secret, algorithm=alg)


def _load_public_keys(path: str, algorithms: Sequence[str]) -> dict[str, Any]:
    """Read the PEM file once and prepare it for every asymmetric algorithm allowed."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read public_key_file {path!r}: {exc.strerror}") from exc
    if b"PRIVATE KEY" in pem:
        raise ValueError(f"public_key_file {path!r} holds a private key; give the public key")
    keys: dict[str, Any] = {}
    for alg in algorithms:
        algorithm = get_default_algorithms()[alg]
        try:
            key = algorithm.prepare_key(pem)
        except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ValueError(
                f"public_key_file {path!r} holds no key usable for {alg}: {_detail(exc)}"
            ) from exc
        weak = algorithm.check_key_length(key)
        if weak is not None:
            raise ValueError(f"public_key_file {path!r} holds a key too weak for {alg}")
        keys[alg] = key
    return keys


def _unverified_claims(token: str) -> dict[str, Any]:
    """Return the payload without checks, only to name values in error messages."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.DecodeError:
        # Only called after PyJWT has already parsed this token, so this cannot happen;
        # an empty payload just makes the message less specific.
        return {}
    return claims


def _expired_message(token: str) -> str:
    exp = _unverified_claims(token).get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp):
        try:
            when = datetime.fromtimestamp(exp, tz=UTC).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            return "token expired"
        return f"token expired at {when}"
    return "token expired"


# --------------------------------------------------------------------------- request


def token_from_request(
    auth_payload: object, headers: Mapping[str, str], query: Mapping[str, str]
) -> str | None:
    """Return the connection's token, or None.

    Precedence: the CONNECT auth payload ``{"token": ...}``, then ``authorization: Bearer <t>``
    (``headers`` keys are lower-case), then the ``token`` query parameter. Empty values count
    as absent.
    """
    if isinstance(auth_payload, Mapping):
        token = auth_payload.get("token")
        if isinstance(token, str) and token:
            return token
    authorization = headers.get("authorization")
    if authorization:
        parts = authorization.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer":
            return parts[1].strip()
    token = query.get("token")
    if token:
        return token
    return None
