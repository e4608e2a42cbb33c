"""Who is connecting: bearer tokens (JWT) checked against a pinned algorithm.

The algorithm comes from the configuration, never from the token's header, so
a token cannot downgrade itself to "none" or switch HS256/RS256 keys. The key
is loaded and checked once (at startup and on every reload), so a weak or
wrong key file stops the instance with a message instead of failing, or
warning, on each connection.

Everything a client sends here is hostile input: :meth:`Authenticator.authenticate`
raises :class:`AuthError` and nothing else, whatever the token holds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .config import AuthConfig

# A JWT is three base64url segments; real ones are a few hundred bytes. The
# bound keeps parsing and signature checks cheap for whatever arrives.
MAX_TOKEN_CHARS = 8192
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_HS256_SECRET_BYTES = 32
MIN_RSA_KEY_BITS = 2048
# Past this an expiry is "never" for every practical purpose, and it stays a
# float that timers accept (a token may carry exp = 10**400).
_FAR_FUTURE_S = float(2**53)
_TIME_CLAIMS = ("exp", "nbf", "iat")


class AuthError(Exception):
    """The request is not allowed; ``status`` and ``code`` say how to answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class KeyFileError(ValueError):
    """The configured key file cannot be used; the message says why (never its bytes)."""


@dataclass(frozen=True)
class Identity:
    uid: str
    # Seconds since the epoch after which the token would no longer be
    # accepted (its exp plus the configured leeway); None when tokens are off.
    expires_at: float | None


def load_key(path: Path, algorithm: str) -> Any:
    """The verification key in ``path`` for ``algorithm``; raises KeyFileError or OSError.

    HS256: the file's bytes, surrounding whitespace stripped, are the shared
    secret (at least 32 bytes). RS256/ES256: a PEM public key or certificate;
    a private key is refused, since a gateway only verifies and a stolen
    private key would let anyone mint tokens for every user.
    """
    raw = path.read_bytes()
    if algorithm == "HS256":
        secret = raw.strip()
        if secret.startswith(b"-----BEGIN") or secret.startswith(b"ssh-"):
            raise KeyFileError(
                f"{path}: holds a PEM/SSH key, but auth.jwt_algorithm is HS256, which needs "
                "a shared secret (for a key pair set auth.jwt_algorithm to RS256 or ES256)"
            )
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise KeyFileError(
                f"{path}: an HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes, "
                f"got {len(secret)} (generate one with: openssl rand -base64 48)"
            )
        return secret
    if algorithm not in ("RS256", "ES256"):
        raise KeyFileError(f"unsupported algorithm {algorithm!r}")
    key = _public_key(path, raw)
    if algorithm == "RS256":
        if not isinstance(key, rsa.RSAPublicKey):
            raise KeyFileError(f"{path}: RS256 needs an RSA public key")
        if key.key_size < MIN_RSA_KEY_BITS:
            raise KeyFileError(
                f"{path}: an RS256 key must have at least {MIN_RSA_KEY_BITS} bits, "
                f"got {key.key_size}"
            )
    elif not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path}: ES256 needs an EC public key on curve P-256")
    return key


def _public_key(path: Path, raw: bytes) -> Any:
    if b"PRIVATE KEY-----" in raw:
        raise KeyFileError(
            f"{path}: holds a private key; give the gateway only the public key "
            "(openssl pkey -in private.pem -pubout -out public.pem)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in raw:
            return x509.load_pem_x509_certificate(raw).public_key()
        return serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM public key or certificate") from None


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.mode = config.mode
        self._config = config
        self._key: Any = None
        if config.mode == "jwt":
            if config.jwt_secret_file is None:
                raise KeyFileError('auth.jwt_secret_file is required when auth.mode is "jwt"')
            self._key = load_key(config.jwt_secret_file, config.jwt_algorithm)

    @property
    def required(self) -> bool:
        return self.mode == "jwt"

    def authenticate(self, token: str | None, uid: str) -> Identity:
        """Check ``token`` for ``uid``: 401 when missing/invalid/expired, 403 when sub != uid."""
        if self.mode == "none":
            return Identity(uid=uid, expires_at=None)
        if not token:
            raise AuthError(401, "unauthorized", "a bearer token is required")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise AuthError(401, "unauthorized", "token too long")
        if not token.isascii() or token.count(".") != 2:
            raise AuthError(401, "unauthorized", "not a compact JWT")
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[cfg.jwt_algorithm],
                leeway=cfg.jwt_leeway_s,
                issuer=cfg.jwt_issuer,
                audience=cfg.jwt_audience,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": cfg.jwt_audience is not None,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "unauthorized", "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, "unauthorized", f"invalid token: {type(exc).__name__}") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # The library is strict, but this is the trust boundary: whatever
            # it trips over is a bad token, not a server error.
            raise AuthError(401, "unauthorized", f"invalid token: {type(exc).__name__}") from None
        for name in _TIME_CLAIMS:
            value = claims.get(name)
            # RFC 7519 NumericDate: a JSON number (the library also takes "123").
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise AuthError(401, "unauthorized", f"invalid token: {name} is not a number")
        if _lifetime_exceeded(claims, cfg.max_token_lifetime_s, cfg.jwt_leeway_s, time.time()):
            # A token that lives longer than the cap is as good as one that
            # never expires: expiry is the only revocation there is.
            raise AuthError(401, "unauthorized", "token lifetime exceeds auth.max_token_lifetime_s")
        if claims.get("sub") != uid:
            raise AuthError(403, "forbidden", "token subject does not match uid")
        return Identity(uid=uid, expires_at=_expires_at(claims.get("exp"), cfg.jwt_leeway_s))


def _lifetime_exceeded(claims: dict[str, Any], max_s: float, leeway_s: float, now: float) -> bool:
    """Does the token live longer than ``max_s``: exp - iat, or exp - now without iat?

    The claims are JSON numbers here (checked above), possibly huge integers:
    Python compares those exactly, so ``exp = 10**400`` is simply too long.
    Without ``iat`` the remaining lifetime is measured against our clock, so
    the clock skew tolerated elsewhere is tolerated here too.
    """
    exp = claims["exp"]
    iat = claims.get("iat")
    try:
        if iat is not None:
            return bool(exp - iat > max_s)
        return bool(exp - now > max_s + leeway_s)
    except (OverflowError, TypeError, ValueError):
        return True


def _expires_at(exp: object, leeway_s: float) -> float:
    # The library has checked that exp is a number in the future (within the
    # leeway); a session may live exactly as long as its token is accepted.
    try:
        value = float(exp) + leeway_s  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return _FAR_FUTURE_S
    return min(value, _FAR_FUTURE_S) if math.isfinite(value) else _FAR_FUTURE_S


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
