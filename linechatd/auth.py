"""Who is connecting: bearer tokens (JWT) checked against a pinned algorithm.

The algorithm comes from the configuration, never from the token's header, so
a token cannot downgrade itself to "none" or switch HS256/RS256 keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jwt

from .config import AuthConfig


class AuthError(Exception):
    """The request is not allowed; ``status`` and ``code`` say how to answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Identity:
    uid: str
    expires_at: float | None  # seconds since the epoch; None when tokens are off


def load_key(path: Path, algorithm: str) -> str | bytes:
    raw = path.read_bytes()
    if algorithm == "HS256":
        # The file's bytes, surrounding whitespace stripped, are the secret.
        return raw.strip()
    return raw.decode()


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.mode = config.mode
        self._config = config
        self._key: str | bytes | None = None
        if config.mode == "jwt":
            assert config.jwt_secret_file is not None
            self._key = load_key(config.jwt_secret_file, config.jwt_algorithm)

    @property
    def required(self) -> bool:
        return self.mode == "jwt"

    def authenticate(self, token: str | None, uid: str) -> Identity:
        """Check ``token`` for ``uid``: 401 when missing/invalid, 403 when sub != uid."""
        if self.mode == "none":
            return Identity(uid=uid, expires_at=None)
        if not token:
            raise AuthError(401, "unauthorized", "a bearer token is required")
        if len(token) > 8192:
            raise AuthError(401, "unauthorized", "token too long")
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                self._key,  # type: ignore[arg-type]
                algorithms=[cfg.jwt_algorithm],
                leeway=cfg.jwt_leeway_s,
                issuer=cfg.jwt_issuer,
                audience=cfg.jwt_audience,
                options={"require": ["exp", "sub"], "verify_aud": cfg.jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "unauthorized", "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, "unauthorized", f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if sub != uid:
            raise AuthError(403, "forbidden", "token subject does not match uid")
        exp = claims.get("exp")
        return Identity(uid=uid, expires_at=float(exp) if isinstance(exp, int | float) else None)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
