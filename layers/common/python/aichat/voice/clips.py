"""The voice_clips and voice_events tables: the only code that touches them."""

from __future__ import annotations

from ..store import Row, Tx, now_ms

DAY_MS = 86_400_000
MINUTE_MS = 60_000


def find(tx: Tx, *, message_id: int, voice: str, text_hash: str) -> Row | None:
    return tx.one(
        "SELECT id, status, store_key, bytes, created_at FROM voice_clips"
        " WHERE message_id = ? AND voice = ? AND text_hash = ?",
        (message_id, voice, text_hash),
    )


def claim(tx: Tx, *, uid: str, message_id: int, voice: str, text_hash: str, store_key: str) -> bool:
    """Mark a clip as being made; False when another request holds it (the unique key decides)."""
    now = now_ms()
    return (
        tx.insert_unique(
            "INSERT INTO voice_clips (uid, message_id, voice, text_hash, status, store_key, bytes, created_at)"
            " VALUES (?, ?, ?, ?, 'pending', ?, 0, ?)",
            (uid, message_id, voice, text_hash, store_key, now),
        )
        is not None
    )


def take_over(tx: Tx, *, clip_id: int, stale_before: int) -> bool:
    """A pending clip whose maker died (older than `stale_before`) is claimed anew."""
    return bool(
        tx.execute(
            "UPDATE voice_clips SET created_at = ? WHERE id = ? AND status = 'pending' AND created_at < ?",
            (now_ms(), clip_id, stale_before),
        )
    )


def ready(tx: Tx, *, clip_id: int, size: int) -> None:
    tx.execute("UPDATE voice_clips SET status = 'ready', bytes = ? WHERE id = ?", (size, clip_id))


def drop(tx: Tx, *, clip_id: int) -> None:
    tx.execute("DELETE FROM voice_clips WHERE id = ?", (clip_id,))


def orphans(tx: Tx, *, uid: str) -> list[Row]:
    """The user's clips whose message is gone (deleted, cleared, regenerated)."""
    return tx.all(
        "SELECT c.id, c.store_key FROM voice_clips c LEFT JOIN messages m ON m.id = c.message_id"
        " WHERE c.uid = ? AND m.id IS NULL",
        (uid,),
    )


def of_user(tx: Tx, *, uid: str) -> list[Row]:
    return tx.all("SELECT id, store_key FROM voice_clips WHERE uid = ?", (uid,))


def delete_ids(tx: Tx, *, ids: list[int]) -> None:
    if ids:
        tx.execute(f"DELETE FROM voice_clips WHERE id IN ({','.join('?' * len(ids))})", ids)


def usage(tx: Tx, *, uid: str, now: int) -> Row | None:
    """Requests in the last minute (and the oldest), characters in the last day (and the oldest)."""
    return tx.one(
        "SELECT SUM(CASE WHEN created_at > ? THEN 1 ELSE 0 END) AS minute_n,"
        " MIN(CASE WHEN created_at > ? THEN created_at END) AS minute_oldest,"
        " SUM(chars) AS day_chars, MIN(CASE WHEN chars > 0 THEN created_at END) AS day_oldest"
        " FROM voice_events WHERE uid = ? AND created_at > ?",
        (now - MINUTE_MS, now - MINUTE_MS, uid, now - DAY_MS),
    )


def count(tx: Tx, *, uid: str, chars: int, now: int) -> None:
    tx.execute("DELETE FROM voice_events WHERE uid = ? AND created_at <= ?", (uid, now - DAY_MS))
    tx.insert("INSERT INTO voice_events (uid, chars, created_at) VALUES (?, ?, ?)", (uid, chars, now))


def delete_events(tx: Tx, *, uid: str) -> None:
    tx.execute("DELETE FROM voice_events WHERE uid = ?", (uid,))
