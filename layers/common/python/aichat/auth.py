"""Access tokens: PyJWT HS256 with sub=uid, iat and exp, always verified in full."""

from __future__ import annotations

import re
import time
import uuid

from .errors import ApiError

ALGORITHM = "HS256"
UID_PATTERN = re.compile(r"[0-9a-f]{24}")
# Instances' clocks may differ by a little; more than this is a forged or broken token.
CLOCK_LEEWAY_S = 10


def issue_token(uid: str, *, secret: str, ttl_s: int, now: float | None = None) -> str:
    """Sign an access token for a user."""
    import jwt  # PyJWT pulls in `cryptography` (~70 ms): loaded on first use or by preload(), not at start

    issued = int(now if now is not None else time.time())
    claims = {"sub": uid, "iat": issued, "exp": issued + ttl_s, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, *, secret: str) -> dict:
    """Return a token's claims; raise Unauthorized if its signature, algorithm, expiry or claims are off."""
    import jwt

    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],  # pinning the algorithm rules out "none" and key-confusion tricks
            options={"require": ["sub", "iat", "exp"], "verify_signature": True},
            leeway=CLOCK_LEEWAY_S,
        )
    except jwt.PyJWTError as exc:
        raise ApiError("Unauthorized") from exc
    if not isinstance(claims.get("sub"), str) or not UID_PATTERN.fullmatch(claims["sub"]):
        raise ApiError("Unauthorized")
    return claims


def bearer_token(header: str | None) -> str:
    """Extract the token from an `Authorization: Bearer <token>` header, or raise Unauthorized."""
    if not header:
        raise ApiError("Unauthorized")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError("Unauthorized")
    return token


def preload() -> None:
    """Import PyJWT now (FC's initializer) so the first authenticated request does not pay for it."""
    import jwt  # noqa: F401
