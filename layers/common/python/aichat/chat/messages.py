"""The messages table: the only code that writes it. Keyword-only repository functions."""

from __future__ import annotations

import json
from typing import Any

from ..store import Row, Tx, now_ms

HISTORY_COLUMNS = "id, sender_role, content, has_image, is_partial, created_at"
# The history extension `include_tools=1` reads the trace too.
HISTORY_COLUMNS_WITH_TOOLS = HISTORY_COLUMNS + ", tool_calls"
# The same, of the messages table as `m` (history() may join the conversation).
_M_HISTORY_COLUMNS, _M_HISTORY_COLUMNS_WITH_TOOLS = (
    ", ".join(f"m.{name.strip()}" for name in columns.split(","))
    for columns in (HISTORY_COLUMNS, HISTORY_COLUMNS_WITH_TOOLS)
)


def add_user_message(tx: Tx, *, uid: str, role_code: str, conversation_id: str, text: str, has_image: bool) -> int:
    """Store the user's side of a turn; returns its id."""
    return tx.insert(
        "INSERT INTO messages (uid, role_code, conversation_id, sender_role, content, has_image, is_partial,"
        " created_at) VALUES (?, ?, ?, 'user', ?, ?, 0, ?)",
        (uid, role_code, conversation_id, text, int(has_image), now_ms()),
    )


def add_reply(
    tx: Tx,
    *,
    reply_to: int,
    conversation_id: str,
    content: str,
    reasoning: str | None,
    partial: bool,
    usage: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> int | None:
    """Store an assistant reply to the user message `reply_to`, only if that message still exists.

    A clear, a deletion of the message or conversation, or an account deletion that committed while the
    reply was streaming removed it: then nothing is stored (None), so no reply outlives what it answered.
    """
    usage = usage or {}
    return tx.insert_selected(
        "INSERT INTO messages (uid, role_code, conversation_id, sender_role, content, has_image, is_partial,"
        " created_at, prompt_tokens, completion_tokens, reasoning_content, tool_calls)"
        " SELECT uid, role_code, conversation_id, 'assistant', ?, 0, ?, ?, ?, ?, ?, ? FROM messages"
        " WHERE id = ? AND conversation_id = ?",
        (
            content,
            int(partial),
            now_ms(),
            _int(usage.get("prompt_tokens")),
            _int(usage.get("completion_tokens")),
            reasoning,
            _trace(tools),
            reply_to,
            conversation_id,
        ),
    )


def update_reply(
    tx: Tx,
    *,
    message_id: int,
    conversation_id: str,
    content: str,
    reasoning: str | None,
    partial: bool,
    usage: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> bool:
    """Update a reply stored earlier (a checkpoint) to what it is now; False if it was removed meanwhile."""
    usage = usage or {}
    return bool(
        tx.execute(
            "UPDATE messages SET content = ?, reasoning_content = ?, is_partial = ?, prompt_tokens = ?,"
            " completion_tokens = ?, tool_calls = ? WHERE id = ? AND conversation_id = ? AND sender_role = 'assistant'",
            (
                content,
                reasoning,
                int(partial),
                _int(usage.get("prompt_tokens")),
                _int(usage.get("completion_tokens")),
                _trace(tools),
                message_id,
                conversation_id,
            ),
        )
    )


def _trace(tools: list[dict[str, Any]] | None) -> str | None:
    """A reply's tool trace as stored (JSON), or NULL when no tool ran."""
    return json.dumps(tools, ensure_ascii=False, separators=(",", ":")) if tools else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    return value if isinstance(value, int) else None


def get(tx: Tx, *, uid: str, message_id: int) -> Row | None:
    """One of the user's messages with everything stored for it (None for another user's)."""
    return tx.one(
        f"SELECT {HISTORY_COLUMNS}, conversation_id, role_code, reasoning_content, prompt_tokens, completion_tokens,"
        " tool_calls"
        " FROM messages WHERE id = ? AND uid = ?",
        (message_id, uid),
    )


def history(
    tx: Tx,
    *,
    conversation_id: str | None = None,
    default_of: tuple[str, str] | None = None,
    limit: int | None = None,
    before_id: int | None = None,
    with_tools: bool = False,
) -> list[Row]:
    """A conversation's messages oldest first: all of them, or the `limit` newest before `before_id`. The
    conversation is one by id, or a user's default one of a role, `default_of=(uid, role_code)`, found in the
    same query (the hot path of the contract's /chat/history: one round trip, not two)."""
    columns = _M_HISTORY_COLUMNS_WITH_TOOLS if with_tools else _M_HISTORY_COLUMNS
    if conversation_id is not None:
        sql = f"SELECT {columns} FROM messages m WHERE m.conversation_id = ?"
        params: list[Any] = [conversation_id]
    else:
        assert default_of is not None
        sql = (
            f"SELECT {columns} FROM conversations c JOIN messages m ON m.conversation_id = c.id"
            " WHERE c.uid = ? AND c.default_key = ?"
        )
        params = list(default_of)
    if before_id is not None:
        sql += " AND m.id < ?"
        params.append(before_id)
    if limit is None:
        return tx.all(sql + " ORDER BY m.id", params)
    rows = tx.all(sql + " ORDER BY m.id DESC LIMIT ?", [*params, limit])
    rows.reverse()
    return rows


def context(tx: Tx, *, conversation_id: str, before_id: int, limit: int) -> list[Row]:
    """The newest `limit` messages before a turn, oldest first: what the model may be shown."""
    rows = tx.all(
        "SELECT sender_role, content, has_image, tool_calls FROM messages WHERE conversation_id = ? AND id < ?"
        " ORDER BY id DESC LIMIT ?",
        (conversation_id, before_id, limit),
    )
    rows.reverse()
    return rows


def latest(tx: Tx, *, conversation_id: str, limit: int) -> list[Row]:
    """A conversation's newest `limit` messages, newest first (sender and text)."""
    return tx.all(
        "SELECT sender_role, content, created_at FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT ?",
        (conversation_id, limit),
    )


def first_reply_after(tx: Tx, *, conversation_id: str, message_id: int) -> Row | None:
    """The reply that answered a user message (the conversation's next assistant message), if stored."""
    return tx.one(
        f"SELECT {HISTORY_COLUMNS}, role_code, reasoning_content, prompt_tokens, completion_tokens, tool_calls"
        " FROM messages WHERE conversation_id = ? AND id > ? AND sender_role = 'assistant' ORDER BY id LIMIT 1",
        (conversation_id, message_id),
    )


def last_user_message(tx: Tx, *, conversation_id: str) -> Row | None:
    """The conversation's newest user message, locked for a rewrite (regenerate, edit)."""
    return tx.one(
        "SELECT id, content, has_image FROM messages WHERE conversation_id = ? AND sender_role = 'user'"
        " ORDER BY id DESC LIMIT 1" + tx.for_update,
        (conversation_id,),
    )


def delete_after(tx: Tx, *, conversation_id: str, message_id: int) -> int:
    """Drop everything after a message (the replies a regenerate replaces)."""
    return tx.execute("DELETE FROM messages WHERE conversation_id = ? AND id > ?", (conversation_id, message_id))


def rewrite_user_message(tx: Tx, *, message_id: int, text: str, has_image: bool) -> None:
    """Replace a user message's text (edit), keeping its id and place."""
    tx.execute(
        "UPDATE messages SET content = ?, has_image = ?, created_at = ? WHERE id = ?",
        (text, int(has_image), now_ms(), message_id),
    )


def delete_one(tx: Tx, *, uid: str, message_id: int) -> Row | None:
    """Delete one of the user's messages; returns what it was (None for an unknown id or another user's)."""
    # The uid in the WHERE clause is the authorisation: another user's id looks exactly like an unknown one.
    row = tx.one("SELECT id, conversation_id FROM messages WHERE id = ? AND uid = ?", (message_id, uid))
    if row is not None:
        tx.execute("DELETE FROM messages WHERE id = ?", (message_id,))
    return row


def clear(tx: Tx, *, conversation_id: str) -> int:
    """Delete a conversation's messages; returns how many."""
    return tx.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))


def count_by_conversation(tx: Tx, *, conversation_ids: list[str]) -> dict[str, int]:
    """How many messages each of these conversations holds."""
    if not conversation_ids:
        return {}
    rows = tx.all(
        "SELECT conversation_id, COUNT(*) AS n FROM messages WHERE conversation_id IN"
        f" ({','.join('?' * len(conversation_ids))}) GROUP BY conversation_id",
        conversation_ids,
    )
    return {row["conversation_id"]: int(row["n"]) for row in rows}


def delete_for_user(tx: Tx, *, uid: str) -> int:
    """Account deletion: every message of the user."""
    return tx.execute("DELETE FROM messages WHERE uid = ?", (uid,))
