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


def get(tx: Tx, *, uid: str, lock: bool = False) -> Row | None:
    """A user's row."""
    return tx.one(
        "SELECT uid, country_code, phone_number, created_at FROM users WHERE uid = ?" + (tx.for_update if lock else ""),
        (uid,),
    )


def delete(tx: Tx, *, uid: str) -> None:
    """Remove the user's row (the last step of account deletion)."""
    tx.execute("DELETE FROM users WHERE uid = ?", (uid,))
