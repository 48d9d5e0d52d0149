"""The tool_runs table (direct executions, for their per-user rate limit): the only code that touches it."""

from __future__ import annotations

from ..store import Row, Tx

MINUTE_MS = 60_000


def window(tx: Tx, *, uid: str, since_ms: int) -> Row | None:
    """How many executions the user made since `since_ms`, and the oldest of them."""
    return tx.one(
        "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM tool_runs WHERE uid = ? AND created_at > ?",
        (uid, since_ms),
    )


def add(tx: Tx, *, uid: str, tool: str, now: int) -> None:
    """Count one execution (and drop the user's rows the window no longer reads)."""
    tx.execute("DELETE FROM tool_runs WHERE uid = ? AND created_at <= ?", (uid, now - MINUTE_MS))
    tx.insert("INSERT INTO tool_runs (uid, tool, created_at) VALUES (?, ?, ?)", (uid, tool, now))


def delete_for_user(tx: Tx, *, uid: str) -> int:
    """Account deletion."""
    return tx.execute("DELETE FROM tool_runs WHERE uid = ?", (uid,))
