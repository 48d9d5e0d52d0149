"""The conversations table: the only code that writes it. Keyword-only repository functions."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..store import Row, Tx, now_ms
from ..store.schema import auto_title

COLUMNS = "id, uid, role_code, title, default_key, settings, created_at, updated_at, last_message_at, active_at"


@dataclass(frozen=True)
class Conversation:
    """One conversation of a user with a role; the role's default one is the contract's (user, role) history."""

    id: str
    uid: str
    role_code: str
    title: str
    is_default: bool
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0
    last_message_at: int | None = None
    active_at: int = 0


def _from_row(row: Row) -> Conversation:
    try:
        stored = json.loads(row["settings"] or "{}")
    except ValueError:
        stored = {}
    return Conversation(
        id=row["id"],
        uid=row["uid"],
        role_code=row["role_code"],
        title=row["title"],
        is_default=row["default_key"] is not None,
        settings=stored if isinstance(stored, dict) else {},
        created_at=int(row["created_at"]),
        updated_at=int(row["updated_at"]),
        last_message_at=None if row["last_message_at"] is None else int(row["last_message_at"]),
        active_at=int(row["active_at"]),
    )


def get(tx: Tx, *, uid: str, conversation_id: str, lock: bool = False) -> Conversation | None:
    """The user's conversation with this id (None for an unknown id or another user's: they look the same)."""
    row = tx.one(
        f"SELECT {COLUMNS} FROM conversations WHERE id = ? AND uid = ?" + (tx.for_update if lock else ""),
        (conversation_id, uid),
    )
    return _from_row(row) if row else None


def default_for(tx: Tx, *, uid: str, role_code: str, create: bool = True) -> Conversation | None:
    """The role's default conversation of this user, created on first use (race-safe: a unique key decides)."""
    row = tx.one(f"SELECT {COLUMNS} FROM conversations WHERE uid = ? AND default_key = ?", (uid, role_code))
    if row is not None or not create:
        return _from_row(row) if row else None
    conversation = _insert(tx, uid=uid, role_code=role_code, title="", title_custom=False, default=True, settings={})
    if conversation is not None:
        return conversation
    row = tx.one(
        f"SELECT {COLUMNS} FROM conversations WHERE uid = ? AND default_key = ?" + tx.for_update, (uid, role_code)
    )
    assert row is not None  # the duplicate key we hit is that row
    return _from_row(row)


def create(tx: Tx, *, uid: str, role_code: str, title: str | None, settings: dict[str, Any]) -> Conversation:
    """A new (non-default) conversation."""
    kept = {name: value for name, value in settings.items() if value is not None}
    conversation = _insert(
        tx, uid=uid, role_code=role_code, title=title or "", title_custom=bool(title), default=False, settings=kept
    )
    assert conversation is not None  # only default conversations share a unique key
    return conversation


def _insert(
    tx: Tx, *, uid: str, role_code: str, title: str, title_custom: bool, default: bool, settings: dict[str, Any]
) -> Conversation | None:
    now = now_ms()
    conversation_id = secrets.token_hex(12)
    inserted = tx.insert_unique(
        "INSERT INTO conversations (id, uid, role_code, title, title_custom, default_key, settings, created_at,"
        " updated_at, last_message_at, active_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        (
            conversation_id,
            uid,
            role_code,
            title,
            int(title_custom),
            role_code if default else None,
            json.dumps(settings, ensure_ascii=False),
            now,
            now,
            now,
        ),
    )
    if inserted is None:
        return None
    return Conversation(
        id=conversation_id,
        uid=uid,
        role_code=role_code,
        title=title,
        is_default=default,
        settings=settings,
        created_at=now,
        updated_at=now,
        active_at=now,
    )


def list_for_user(
    tx: Tx, *, uid: str, role_code: str | None, limit: int, before: tuple[int, str] | None
) -> list[Conversation]:
    """The user's conversations, most recently active first; `before` = (active_at, id) of the last one seen."""
    sql = f"SELECT {COLUMNS} FROM conversations WHERE uid = ?"
    params: list[Any] = [uid]
    if role_code is not None:
        sql += " AND role_code = ?"
        params.append(role_code)
    if before is not None:
        sql += " AND (active_at < ? OR (active_at = ? AND id < ?))"
        params.extend((before[0], before[0], before[1]))
    sql += " ORDER BY active_at DESC, id DESC LIMIT ?"
    params.append(limit)
    return [_from_row(row) for row in tx.all(sql, params)]


def recent(tx: Tx, *, uid: str, exclude_id: str | None, limit: int) -> list[Conversation]:
    """The user's conversations with messages, the most recent message first (but `exclude_id`)."""
    return [
        _from_row(row)
        for row in tx.all(
            f"SELECT {COLUMNS} FROM conversations WHERE uid = ? AND last_message_at IS NOT NULL AND id <> ?"
            " ORDER BY last_message_at DESC, id LIMIT ?",
            (uid, exclude_id or "", limit),
        )
    ]


def update(tx: Tx, *, conversation: Conversation, title: str | None, settings: dict[str, Any] | None) -> Conversation:
    """Rename and/or change settings (merged; a None value removes the key)."""
    now = now_ms()
    merged = dict(conversation.settings)
    for name, value in (settings or {}).items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    new_title = conversation.title if title is None else title
    tx.execute(
        "UPDATE conversations SET title = ?, title_custom = CASE WHEN ? THEN 1 ELSE title_custom END,"
        " settings = ?, updated_at = ? WHERE id = ?",
        (new_title, int(title is not None), json.dumps(merged, ensure_ascii=False), now, conversation.id),
    )
    return Conversation(**{**conversation.__dict__, "title": new_title, "settings": merged, "updated_at": now})


def touch(tx: Tx, *, conversation_id: str, first_text: str | None = None) -> None:
    """A message was just added: the conversation is active now; its first user message names it."""
    now = now_ms()
    tx.execute(
        "UPDATE conversations SET last_message_at = ?, active_at = ?, updated_at = ? WHERE id = ?",
        (now, now, now, conversation_id),
    )
    if first_text is not None:
        title = auto_title(first_text)
        if title:
            tx.execute(
                "UPDATE conversations SET title = ? WHERE id = ? AND title = '' AND title_custom = 0",
                (title, conversation_id),
            )


def emptied(tx: Tx, *, conversation_id: str) -> None:
    """Its messages were all removed: it has no last message any more."""
    tx.execute(
        "UPDATE conversations SET last_message_at = NULL, updated_at = ? WHERE id = ?", (now_ms(), conversation_id)
    )


def delete(tx: Tx, *, conversation_id: str) -> None:
    """Remove the conversation row (its messages are the caller's business, in the same transaction)."""
    tx.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))


def delete_for_user(tx: Tx, *, uid: str) -> int:
    """Account deletion: every conversation of the user."""
    return tx.execute("DELETE FROM conversations WHERE uid = ?", (uid,))
