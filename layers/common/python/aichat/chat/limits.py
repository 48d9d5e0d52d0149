"""Per-user chat limits: messages per minute and concurrent streams, behind the ChatLimiter seam.

A stream holds a slot with a short lease that a keeper thread of the running process renews, so a slot
of a process that died (OOM, SIGKILL, a reclaimed instance) frees itself within one lease.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from ..config import Settings
from ..errors import ApiError
from ..store import Database, Tx, now_ms

log = logging.getLogger("aichat.chat.limits")

MINUTE_MS = 60_000


class ChatLimiter(Protocol):
    """What the turn engine needs from a limiter (a database one now; a Redis one can follow)."""

    def acquire(self, tx: Tx, *, uid: str) -> int:
        """Count one message and take a stream slot, or raise 429 RateLimited; returns the slot's id."""

    def keep(self, slot_id: int) -> None:
        """The slot's transaction committed: keep its lease alive until release()."""

    def release(self, slot_id: int) -> None:
        """Give a slot back (never raises)."""


class DbChatLimiter:
    """Limits kept in the database, so they hold across every instance."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._held: set[int] = set()
        self._unreleased: set[int] = set()  # releases the database refused: the keeper retries them
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._wake = threading.Event()

    def acquire(self, tx: Tx, *, uid: str) -> int:
        """Enforce the user's limits, count this message and take a slot (inside the caller's transaction)."""
        s = self.settings
        now = now_ms()
        # Lock the user's row so one user's concurrent requests are counted one at a time; a user deleted
        # meanwhile has no row left, and their token no longer counts.
        if tx.one("SELECT uid FROM users WHERE uid = ?" + tx.for_update, (uid,)) is None:
            raise ApiError("Unauthorized")
        tx.execute("DELETE FROM stream_slots WHERE uid = ? AND expires_at <= ?", (uid, now))
        slots = tx.one("SELECT COUNT(*) AS n, MIN(expires_at) AS soonest FROM stream_slots WHERE uid = ?", (uid,))
        if slots and slots["n"] >= s.chat_max_concurrent_streams:
            # A live stream renews its lease, so this is a lower bound: when its stream ends, a slot frees sooner.
            retry = _seconds(slots["soonest"] - now)
            raise ApiError("RateLimited", "同时进行的对话过多，请等当前回复结束", retry_after=retry)
        window = tx.one(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM chat_events WHERE uid = ? AND created_at > ?",
            (uid, now - MINUTE_MS),
        )
        if window and window["n"] >= s.chat_messages_per_minute:
            raise ApiError(
                "RateLimited", "发送太快了，请稍后再试", retry_after=_seconds(window["oldest"] + MINUTE_MS - now)
            )
        # Events older than the window are never read again; trimming here keeps the table small.
        tx.execute("DELETE FROM chat_events WHERE uid = ? AND created_at <= ?", (uid, now - MINUTE_MS))
        tx.insert("INSERT INTO chat_events (uid, created_at) VALUES (?, ?)", (uid, now))
        return tx.insert(
            "INSERT INTO stream_slots (uid, expires_at) VALUES (?, ?)", (uid, now + s.stream_lease_s * 1000)
        )

    def release(self, slot_id: int) -> None:
        """Free a slot; if the database is down, the keeper retries (and its lease runs out meanwhile)."""
        with self._lock:
            self._held.discard(slot_id)
        try:
            with self.db.tx() as tx:
                tx.execute("DELETE FROM stream_slots WHERE id = ?", (slot_id,))
        except ApiError:
            log.error("could not release a stream slot; retrying", extra={"slot_id": slot_id})
            with self._lock:
                self._unreleased.add(slot_id)
            self.keep(slot_id, renew=False)

    # -- the lease keeper ----------------------------------------------------------------------------
    def keep(self, slot_id: int, *, renew: bool = True) -> None:
        """Renew this slot's lease while the stream runs (a process-wide thread, one UPDATE per period)."""
        with self._lock:
            if renew:
                self._held.add(slot_id)
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="aichat-slot-keeper", daemon=True)
                self._keeper.start()

    def _keep(self) -> None:
        """Renew every slot this process holds, a few times per lease, in one statement."""
        period = max(1.0, self.settings.stream_lease_s / 3)
        while True:
            self._wake.wait(period)
            with self._lock:
                held, unreleased = sorted(self._held), sorted(self._unreleased)
            if not held and not unreleased:
                continue
            try:
                with self.db.tx() as tx:
                    if held:
                        tx.execute(
                            f"UPDATE stream_slots SET expires_at = ? WHERE id IN ({','.join('?' * len(held))})",
                            (now_ms() + self.settings.stream_lease_s * 1000, *held),
                        )
                    if unreleased:
                        tx.execute(
                            f"DELETE FROM stream_slots WHERE id IN ({','.join('?' * len(unreleased))})", unreleased
                        )
                with self._lock:
                    self._unreleased.difference_update(unreleased)
            except ApiError:
                log.warning("could not renew stream slots", extra={"slots": len(held)})
            except Exception:  # the keeper must outlive any one failure, or every lease would lapse
                log.exception("slot keeper failed")


def _seconds(ms: int) -> int:
    return max(1, -(-int(ms) // 1000))


def delete_for_user(tx: Tx, *, uid: str) -> None:
    """Account deletion: the user's counters and slots."""
    tx.execute("DELETE FROM chat_events WHERE uid = ?", (uid,))
    tx.execute("DELETE FROM stream_slots WHERE uid = ?", (uid,))
