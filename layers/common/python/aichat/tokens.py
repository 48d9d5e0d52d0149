"""Access tokens: PyJWT HS256 with sub=uid, iat, exp and jti, always verified in full; revocation and liveness.

Both services use this module: LoginService issues and revokes, both check that a token is still live.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from .errors import ApiError
from .store import Database, Tx, now_ms

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


def token_is_live(db: Database, claims: dict[str, Any]) -> bool:
    """Whether a verified token still counts: its user exists and it was not revoked (one query)."""
    jti = claims.get("jti") if isinstance(claims.get("jti"), str) else ""
    row = db.read(
        lambda tx: tx.one(
            "SELECT u.uid, r.jti FROM users u LEFT JOIN revoked_tokens r ON r.jti = ? WHERE u.uid = ?",
            (jti[:64], claims["sub"]),
        )
    )
    return row is not None and row["jti"] is None


def revoke(tx: Tx, claims: dict[str, Any]) -> None:
    """Refuse this token on every instance from now on (kept only until it would have expired anyway)."""
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        return  # every token this service issues has a jti; anything else cannot be revoked by id
    tx.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now_ms(),))
    tx.insert_unique(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?)", (jti[:64], int(claims["exp"]) * 1000)
    )
