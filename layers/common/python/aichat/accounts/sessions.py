"""The sessions, refresh_tokens and login_failures tables: the only code that touches them.

A session is one sign-in (SMS or password): its access tokens carry its id (`sid`), and its refresh tokens
rotate within it. Refresh tokens are opaque random values stored as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import secrets

from ..store import Row, Tx, now_ms


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(tx: Tx, *, uid: str, ttl_ms: int, client_ip: str, user_agent: str) -> str:
    """A new session; returns its id."""
    sid = secrets.token_hex(12)
    now = now_ms()
    tx.execute(
        "INSERT INTO sessions (id, uid, created_at, last_used_at, expires_at, client_ip, user_agent, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
        (sid, uid, now, now, now + ttl_ms, client_ip[:64], user_agent[:255]),
    )
    return sid


def add_refresh(tx: Tx, *, sid: str, uid: str, ttl_ms: int) -> str:
    """A new refresh token of a session (the value is returned once, only its hash is kept)."""
    token = secrets.token_urlsafe(32)
    now = now_ms()
    tx.execute(
        "INSERT INTO refresh_tokens (token_hash, session_id, uid, created_at, expires_at, used_at)"
        " VALUES (?, ?, ?, ?, ?, NULL)",
        (token_hash(token), sid, uid, now, now + ttl_ms),
    )
    return token


def find_refresh(tx: Tx, *, token: str) -> Row | None:
    return tx.one(
        "SELECT r.session_id, r.uid, r.expires_at, r.used_at, s.revoked_at FROM refresh_tokens r"
        " LEFT JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = ?",
        (token_hash(token),),
    )


def use_refresh(tx: Tx, *, token: str) -> bool:
    """Mark a refresh token used; False when it was used already (the database decides a race)."""
    return bool(
        tx.execute(
            "UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
            (now_ms(), token_hash(token)),
        )
    )


def touch(tx: Tx, *, sid: str, ttl_ms: int) -> None:
    now = now_ms()
    tx.execute("UPDATE sessions SET last_used_at = ?, expires_at = ? WHERE id = ?", (now, now + ttl_ms, sid))


def revoke(tx: Tx, *, sid: str) -> None:
    """End a session: its access tokens stop counting, its refresh tokens go."""
    tx.execute("UPDATE sessions SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now_ms(), sid))
    tx.execute("DELETE FROM refresh_tokens WHERE session_id = ?", (sid,))


def revoke_all(tx: Tx, *, uid: str, keep: str | None = None) -> int:
    """End every session of the user (but `keep`); returns how many."""
    rows = tx.all("SELECT id FROM sessions WHERE uid = ? AND revoked_at IS NULL", (uid,))
    ended = [row["id"] for row in rows if row["id"] != keep]
    for sid in ended:
        revoke(tx, sid=sid)
    return len(ended)


def live(tx: Tx, *, uid: str) -> list[Row]:
    """The user's sessions that still count, most recently used first."""
    return tx.all(
        "SELECT id, created_at, last_used_at, client_ip, user_agent FROM sessions"
        " WHERE uid = ? AND revoked_at IS NULL AND expires_at > ? ORDER BY last_used_at DESC, id",
        (uid, now_ms()),
    )


def owned(tx: Tx, *, uid: str, sid: str) -> Row | None:
    return tx.one("SELECT id, revoked_at FROM sessions WHERE id = ? AND uid = ?", (sid, uid))


def failures(tx: Tx, *, account_key: str, client_ip: str, since: int) -> Row | None:
    """Failed password logins since `since`: for the account and for the IP, with the oldest of each."""
    return tx.one(
        "SELECT SUM(CASE WHEN account_key = ? THEN 1 ELSE 0 END) AS by_account,"
        " MIN(CASE WHEN account_key = ? THEN created_at END) AS account_oldest,"
        " SUM(CASE WHEN client_ip = ? THEN 1 ELSE 0 END) AS by_ip,"
        " MIN(CASE WHEN client_ip = ? THEN created_at END) AS ip_oldest"
        " FROM login_failures WHERE (account_key = ? OR client_ip = ?) AND created_at > ?",
        (account_key, account_key, client_ip, client_ip, account_key, client_ip, since),
    )


def add_failure(tx: Tx, *, account_key: str, client_ip: str, window_ms: int) -> None:
    now = now_ms()
    tx.execute("DELETE FROM login_failures WHERE account_key = ? AND created_at <= ?", (account_key, now - window_ms))
    tx.execute(
        "INSERT INTO login_failures (account_key, client_ip, created_at) VALUES (?, ?, ?)",
        (account_key[:254], client_ip[:64], now),
    )


def clear_failures(tx: Tx, *, account_key: str) -> None:
    tx.execute("DELETE FROM login_failures WHERE account_key = ?", (account_key,))


def delete_for_user(tx: Tx, *, uid: str) -> None:
    """Account deletion: sessions and refresh tokens."""
    tx.execute("DELETE FROM refresh_tokens WHERE uid = ?", (uid,))
    tx.execute("DELETE FROM sessions WHERE uid = ?", (uid,))
