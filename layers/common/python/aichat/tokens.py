"""Access tokens: PyJWT HS256 with sub=uid, iat, exp and jti, always verified in full; revocation and liveness.

Both services use this module: LoginService issues and revokes, both check that a token is still live.
"""

from __future__ import annotations

import contextlib
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


def issue_token(uid: str, *, secret: str, ttl_s: int, now: float | None = None, sid: str | None = None) -> str:
    """Sign an access token for a user (of a session, `sid`, when it has one)."""
    import jwt  # PyJWT pulls in `cryptography` (~70 ms): loaded on first use or by preload(), not at start

    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": uid, "iat": issued, "exp": issued + ttl_s, "jti": uuid.uuid4().hex}
    if sid:
        claims["sid"] = sid
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# Tokens whose signature and claims were verified, by their exact text: a client presents the same token on
# every request until it expires, and PyJWT's full decode costs more than the rest of a cached check. Only
# `exp` can change its verdict later, so a hit checks that again; the text itself is the signed input, so
# a hit cannot be forged. Bounded; cleared wholesale when full (a flood of tokens costs a decode each).
VERIFIED_MAX = 4096
_verified: dict[tuple[str, str], dict] = {}


def verify_token(token: str, *, secret: str) -> dict:
    """Return a token's claims; raise Unauthorized if its signature, algorithm, expiry or claims are off."""
    cached = _verified.get((secret, token))
    if cached is not None:
        if time.time() < cached["exp"] + CLOCK_LEEWAY_S:
            return cached
        _verified.pop((secret, token), None)
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
    if len(_verified) >= VERIFIED_MAX:
        _verified.clear()
    _verified[(secret, token)] = claims
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


# A session's "last used" is written at most this often (a read path should rarely write).
TOUCH_EVERY_MS = 300_000


# With Redis, a token found live is remembered this long, and the database sees at most one liveness query
# per token per this period across all instances. A revocation also moves the user's generation (below),
# which ends every cached answer for the user at once: with Redis up a revocation is immediate everywhere;
# one made while Redis was away reaches every instance within this period.
LIVE_CACHE_MS = 1000
# A generation outlives every answer cached under it by far (it only has to outlive LIVE_CACHE_MS).
GENERATION_MS = 600_000


def token_is_live(db: Database, claims: dict[str, Any], redis: Any = None) -> bool:
    """Whether a verified token still counts (one query): its user exists, it was not revoked, and its
    session was not ended (a token without a session: it was issued after the user last ended them all).
    With Redis (optional), a live answer is cached for LIVE_CACHE_MS under the user's revocation generation;
    Redis down: the database answers."""
    if redis is None:
        return _live_in_db(db, claims)
    from .fastpath import RedisUnavailable

    key = redis.key("live", str(claims.get("jti") or f"{claims['sub']}:{claims.get('iat')}")[:64])
    generation_key = redis.key("gen", claims["sub"])
    try:
        cached, generation = redis.run(lambda r: r.mget(key, generation_key))
    except RedisUnavailable:
        return _live_in_db(db, claims)
    # Read before the database is asked, so a revocation committed meanwhile makes this answer stale at once.
    generation = generation or "-"
    if cached == generation:
        return True
    live = _live_in_db(db, claims)
    if live:
        with contextlib.suppress(RedisUnavailable):
            redis.run(lambda r: r.set(key, generation, px=LIVE_CACHE_MS))
    return live


def revoked(redis: Any, uid: str) -> None:
    """After a revocation of the user's tokens committed: every instance's cached "live" for them ends now."""
    if redis is None:
        return
    from .fastpath import RedisUnavailable

    with contextlib.suppress(RedisUnavailable):
        redis.run(lambda r: r.set(redis.key("gen", uid), uuid.uuid4().hex, px=GENERATION_MS))


def _live_in_db(db: Database, claims: dict[str, Any]) -> bool:
    jti = claims.get("jti") if isinstance(claims.get("jti"), str) else ""
    sid = claims.get("sid") if isinstance(claims.get("sid"), str) else ""
    row = db.read(
        lambda tx: tx.one(
            "SELECT u.uid, u.sessions_after, r.jti, s.id AS sid, s.revoked_at, s.last_used_at FROM users u"
            " LEFT JOIN revoked_tokens r ON r.jti = ? LEFT JOIN sessions s ON s.id = ? AND s.uid = u.uid"
            " WHERE u.uid = ?",
            (jti[:64], sid[:24], claims["sub"]),
        )
    )
    if row is None or row["jti"] is not None:
        return False
    if sid:
        if row["sid"] is None or row["revoked_at"] is not None:
            return False
        if now_ms() - int(row["last_used_at"]) > TOUCH_EVERY_MS:
            _touch(db, sid)
        return True
    after = row["sessions_after"]
    return after is None or int(claims["iat"]) * 1000 >= int(after)


def _touch(db: Database, sid: str) -> None:
    try:
        with db.tx() as tx:
            tx.execute("UPDATE sessions SET last_used_at = ? WHERE id = ?", (now_ms(), sid))
    except ApiError:
        pass  # a missed "last used" is not worth failing a request


def revoke(tx: Tx, claims: dict[str, Any]) -> None:
    """Refuse this token on every instance from now on (kept only until it would have expired anyway)."""
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        return  # every token this service issues has a jti; anything else cannot be revoked by id
    tx.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now_ms(),))
    tx.insert_unique(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?)", (jti[:64], int(claims["exp"]) * 1000)
    )
