"""Reading and clearing what was said: history (whole or paged), clear, delete one message."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..store import Database, Row
from . import conversations, input, messages
from .roles import RoleCatalog
from .targets import check_role, resolve
from .tooluse import parse_trace, public_trace

log = logging.getLogger("aichat.chat")

HISTORY_PAGE_DEFAULT = 50
HISTORY_PAGE_MAX = 200


def format_time(ms: int, settings: Settings) -> str:
    """`YYYY-MM-DDTHH:MM:SS` in the configured time zone, as the contract shows."""
    return datetime.fromtimestamp(ms // 1000, settings.tz).replace(tzinfo=None).isoformat()


def history_item(row: Row, settings: Settings) -> dict[str, Any]:
    """The contract's HistoryMessage (plus `tools` on a reply that used them, when the trace was asked for)."""
    item = {
        "id": int(row["id"]),
        "sender_role": row["sender_role"],
        "content": row["content"],
        "has_image": bool(row["has_image"]),
        "is_partial": bool(row["is_partial"]),
        "created_at": format_time(row["created_at"], settings),
    }
    if row.get("tool_calls"):
        item["tools"] = public_trace(parse_trace(row["tool_calls"]))
    return item


class History:
    """History, clear and message deletion for the user's conversations."""

    def __init__(
        self, settings: Settings, db: Database, roles: RoleCatalog, *, on_removed: Callable[[str], Any] | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.roles = roles
        self.on_removed = on_removed or (lambda uid: None)  # cached audio of removed messages goes too

    def history(self, uid: str, args: Any) -> dict[str, Any]:
        """A conversation's messages, oldest first; a page of them when `limit`/`before_id` is given.

        Without paging parameters or conversation_id the answer is exactly the contract's.
        """
        target = input.target(args)
        role = check_role(self.roles, target)
        limit = input.query_int(args, "limit", low=1, high=HISTORY_PAGE_MAX)
        before_id = input.query_int(args, "before_id", low=1, high=input.MAX_ID)
        with_tools = input.query_int(args, "include_tools", low=0, high=1) == 1
        paged = limit is not None or before_id is not None
        page_size = limit or HISTORY_PAGE_DEFAULT
        limit_rows = page_size + 1 if paged else None

        def read(tx: Any) -> tuple[str, list[Row]]:
            if target.conversation_id is None:  # a role's default one (empty if never used): one query
                assert role is not None
                rows = messages.history(
                    tx, default_of=(uid, role.role_code), limit=limit_rows, before_id=before_id, with_tools=with_tools
                )
                return role.role_code, rows
            conversation = resolve(tx, uid=uid, target=target, create=False)
            assert conversation is not None  # resolve() answers 404 for an id that is not the user's
            rows = messages.history(
                tx, conversation_id=conversation.id, limit=limit_rows, before_id=before_id, with_tools=with_tools
            )
            return conversation.role_code, rows

        role_code, rows = self.db.read(read)
        body: dict[str, Any] = {"success": True, "role_code": role_code}
        if target.conversation_id is not None:
            body["conversation_id"] = target.conversation_id
        if not paged:
            body["messages"] = [history_item(row, self.settings) for row in rows]
            return body
        # One extra row was read (the oldest) to learn whether more remain.
        has_more = len(rows) > page_size
        rows = rows[1:] if has_more else rows
        body["messages"] = [history_item(row, self.settings) for row in rows]
        body["has_more"] = has_more
        body["next_before_id"] = int(rows[0]["id"]) if has_more and rows else None
        return body

    def clear(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Delete the messages of one conversation (the role's default one without conversation_id)."""
        target = input.target(body)
        check_role(self.roles, target)
        with self.db.tx() as tx:
            conversation = resolve(tx, uid=uid, target=target, create=False)
            deleted = 0
            if conversation is not None:
                deleted = messages.clear(tx, conversation_id=conversation.id)
                conversations.emptied(tx, conversation_id=conversation.id)
        log.info("conversation cleared", extra={"uid": uid, "deleted": deleted})
        if deleted:
            self.on_removed(uid)
        return {"success": True, "message": "当前聊天已清空", "deleted_count": deleted}

    def delete_message(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Delete one of this user's messages by id (404 for an unknown id or another user's message)."""
        message_id = input.message_id(body.get("message_id"))
        with self.db.tx() as tx:
            deleted = messages.delete_one(tx, uid=uid, message_id=message_id)  # type: ignore[arg-type]
        if deleted is None:
            raise ApiError("MessageNotFound")
        self.on_removed(uid)
        return {"success": True, "message": "消息已删除", "deleted_count": 1}
