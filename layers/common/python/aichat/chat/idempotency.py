"""Idempotency keys: a retried send is not a second message (the idempotency_keys table's only code).

A key (the `Idempotency-Key` header, or `client_message_id` in the body) is claimed in the transaction
that stores the turn's user message, so of two concurrent first requests exactly one runs (the primary
key (uid, key) decides). A repeat finds the row: finished → the stored outcome again, no new rows and no
upstream call; still running → 409 `RequestInProgress`; another body → 422 `IdempotencyKeyReused`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..store import Row, Tx, now_ms

KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
BODY_FIELD = "client_message_id"


def key_of(body: dict[str, Any], header: str | None) -> str | None:
    """The request's key (header first), validated; None without one."""
    value: Any = header if header is not None else body.get(BODY_FIELD)
    if value is None:
        return None
    if header is not None and body.get(BODY_FIELD) not in (None, header):
        raise ApiError("InvalidInput", "Idempotency-Key 与 client_message_id 不一致")
    if not isinstance(value, str) or not KEY_RE.fullmatch(value):
        raise ApiError("InvalidInput", "幂等键必须是 1–64 个字母、数字、下划线或连字符")
    return value


def request_hash(operation: str, body: dict[str, Any]) -> str:
    """What makes two requests "the same": the operation and the body (its key aside)."""
    canonical = {k: v for k, v in body.items() if k != BODY_FIELD}
    text = json.dumps({"op": operation, "body": canonical}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Replay:
    """A repeat of a finished request: what the first one stored."""

    operation: str
    status: str  # done (the turn ran; its reply is stored) or failed (refused before its first frame)
    conversation_id: str | None
    user_message_id: int | None
    reply_message_id: int | None
    error_code: str | None
    error_message: str | None
    response: dict[str, Any] | None


def lookup(tx: Tx, *, uid: str, key: str, digest: str, ttl_ms: int, running_for_ms: int) -> Replay | None:
    """The earlier use of this key, if any (locked); raises 422 for another body, 409 while it runs."""
    now = now_ms()
    tx.execute("DELETE FROM idempotency_keys WHERE uid = ? AND expires_at <= ?", (uid, now))
    row = tx.one(
        "SELECT request_hash, operation, status, conversation_id, user_message_id, reply_message_id, error_code,"
        " error_message, response, created_at FROM idempotency_keys WHERE uid = ? AND idem_key = ?" + tx.for_update,
        (uid, key),
    )
    if row is None:
        return None
    if row["request_hash"] != digest:
        raise ApiError("IdempotencyKeyReused")
    if row["status"] == "running" and now - int(row["created_at"]) < running_for_ms:
        raise ApiError("RequestInProgress", retry_after=2)
    return _replay(row)


def _replay(row: Row) -> Replay:
    response = json.loads(row["response"]) if row["response"] else None
    return Replay(
        operation=row["operation"],
        status="done" if row["status"] == "running" else row["status"],  # a stale run: what it stored
        conversation_id=row["conversation_id"],
        user_message_id=row["user_message_id"],
        reply_message_id=row["reply_message_id"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        response=response,
    )


def claim(
    tx: Tx, *, uid: str, key: str, digest: str, operation: str, conversation_id: str, user_message_id: int, ttl_ms: int
) -> None:
    """Record the key with the turn it starts; a concurrent first request that claimed it first → 409."""
    now = now_ms()
    inserted = tx.insert_unique(
        "INSERT INTO idempotency_keys (uid, idem_key, request_hash, operation, status, conversation_id,"
        " user_message_id, created_at, expires_at) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
        (uid, key, digest, operation, conversation_id, user_message_id, now, now + ttl_ms),
    )
    if inserted is None:
        raise ApiError("RequestInProgress", retry_after=2)


def note(tx: Tx, *, uid: str, key: str, response: dict[str, Any]) -> None:
    """Keep something a repeat needs to know about the first request (e.g. where a continued reply began)."""
    tx.execute(
        "UPDATE idempotency_keys SET response = ? WHERE uid = ? AND idem_key = ?",
        (json.dumps(response, ensure_ascii=False), uid, key),
    )


def finish(
    tx: Tx,
    *,
    uid: str,
    key: str,
    reply_message_id: int | None,
    error: ApiError | None = None,
    response: dict[str, Any] | None = None,
    failed: bool = False,
) -> None:
    """The turn ended (or, `failed`, was refused before its first frame): what a repeat answers from now on."""
    tx.execute(
        "UPDATE idempotency_keys SET status = ?, reply_message_id = COALESCE(?, reply_message_id),"
        " error_code = ?, error_message = ?, response = COALESCE(?, response) WHERE uid = ? AND idem_key = ?",
        (
            "failed" if failed else "done",
            reply_message_id,
            error.code if error else None,
            error.message if error else None,
            json.dumps(response, ensure_ascii=False) if response is not None else None,
            uid,
            key,
        ),
    )


def delete_for_user(tx: Tx, *, uid: str) -> int:
    """Account deletion."""
    return tx.execute("DELETE FROM idempotency_keys WHERE uid = ?", (uid,))


class Keyed:
    """A request's idempotency key (the header or `client_message_id`) and what it is the key of."""

    def __init__(self, operation: str, body: dict[str, Any], header: str | None) -> None:
        self.operation = operation
        self.key = key_of(body, header)
        self.digest = request_hash(operation, body) if self.key else ""

    def repeat_of(self, tx: Tx, *, uid: str, settings: Settings) -> Replay | None:
        """An earlier use of this key by the user (see idempotency.lookup); a run older than a reply can last
        (its bound, plus the save window, plus a minute) lost its instance and counts as finished."""
        assert self.key
        running_ms = int((settings.reply_max_seconds + settings.reply_save_window_s + 60) * 1000)
        return lookup(
            tx,
            uid=uid,
            key=self.key,
            digest=self.digest,
            ttl_ms=settings.idempotency_ttl_s * 1000,
            running_for_ms=running_ms,
        )
