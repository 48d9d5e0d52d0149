"""The users table: the only code that writes it."""

from __future__ import annotations

import secrets

from ..store import Row, Tx, now_ms
from .phone import Phone


def user_for(tx: Tx, *, phone: Phone) -> str:
    """The uid of a phone's user, created on first login (race-safe: the unique phone key decides)."""
    sql = "SELECT uid FROM users WHERE country_code = ? AND phone_number = ?"
    row = tx.one(sql, (phone.country_code, phone.phone_number))
    if row:
        return row["uid"]
    uid = secrets.token_hex(12)
    if (
        tx.insert_unique(
            "INSERT INTO users (uid, country_code, phone_number, created_at) VALUES (?, ?, ?, ?)",
            (uid, phone.country_code, phone.phone_number, now_ms()),
        )
        is None
    ):
        # A concurrent first login created the user; a locking read sees their committed row.
        row = tx.one(sql + tx.for_update, (phone.country_code, phone.phone_number))
        assert row is not None
        return row["uid"]
    return uid


PROFILE_COLUMNS = (
    "uid, country_code, phone_number, created_at, username, email, nickname, avatar_url, bio, password_hash,"
    " sessions_after"
)


def get(tx: Tx, *, uid: str, lock: bool = False) -> Row | None:
    """A user's row (the profile and the password hash included)."""
    return tx.one(f"SELECT {PROFILE_COLUMNS} FROM users WHERE uid = ?" + (tx.for_update if lock else ""), (uid,))


def create_with_password(
    tx: Tx,
    *,
    username: str,
    username_key: str,
    email: str | None,
    email_key: str | None,
    nickname: str | None,
    password_hash: str,
) -> str | None:
    """A password account; None when the username or email is taken (the unique keys decide)."""
    uid = secrets.token_hex(12)
    now = now_ms()
    inserted = tx.insert_unique(
        "INSERT INTO users (uid, country_code, phone_number, created_at, username, username_key, email, email_key,"
        " nickname, password_hash, updated_at) VALUES (?, NULL, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
        (uid, now, username, username_key, email, email_key, nickname, password_hash, now),
    )
    return None if inserted is None else uid


def taken(tx: Tx, *, username_key: str, email_key: str | None) -> str | None:
    """Which of the two is already someone's ("username", "email"), if either."""
    if tx.one("SELECT uid FROM users WHERE username_key = ?", (username_key,)):
        return "username"
    if email_key and tx.one("SELECT uid FROM users WHERE email_key = ?", (email_key,)):
        return "email"
    return None


def by_username(tx: Tx, *, username_key: str) -> Row | None:
    return tx.one(f"SELECT {PROFILE_COLUMNS} FROM users WHERE username_key = ?", (username_key,))


def by_email(tx: Tx, *, email_key: str) -> Row | None:
    return tx.one(f"SELECT {PROFILE_COLUMNS} FROM users WHERE email_key = ?", (email_key,))


def by_phone(tx: Tx, *, phone: Phone) -> Row | None:
    return tx.one(
        f"SELECT {PROFILE_COLUMNS} FROM users WHERE country_code = ? AND phone_number = ?",
        (phone.country_code, phone.phone_number),
    )


def set_password(tx: Tx, *, uid: str, password_hash: str) -> None:
    tx.execute("UPDATE users SET password_hash = ?, updated_at = ? WHERE uid = ?", (password_hash, now_ms(), uid))


def end_sessions_before(tx: Tx, *, uid: str, at_ms: int) -> None:
    """Access tokens issued before this instant without a session of their own no longer count."""
    tx.execute("UPDATE users SET sessions_after = ? WHERE uid = ?", (at_ms, uid))


def update_profile(tx: Tx, *, uid: str, values: dict[str, str | None]) -> None:
    allowed = {"nickname", "avatar_url", "bio"}
    assert set(values) <= allowed
    if values:
        assignments = ", ".join(f"{name} = ?" for name in values)
        tx.execute(f"UPDATE users SET {assignments}, updated_at = ? WHERE uid = ?", (*values.values(), now_ms(), uid))


def delete(tx: Tx, *, uid: str) -> None:
    """Remove the user's row (the last step of account deletion)."""
    tx.execute("DELETE FROM users WHERE uid = ?", (uid,))
