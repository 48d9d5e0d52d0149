"""The conversation operations: create, list (most recently active first), show, update, delete."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..store import Database
from . import conversations, input, messages
from .conversations import Conversation
from .history import format_time
from .roles import RoleCatalog

PAGE_DEFAULT = 20
PAGE_MAX = 100
_CURSOR = re.compile(r"([0-9]{1,16}):([0-9a-f]{24})")


def encode_cursor(conversation: Conversation) -> str:
    """An opaque cursor: where the next page starts (after this conversation)."""
    return base64.urlsafe_b64encode(f"{conversation.active_at}:{conversation.id}".encode()).decode().rstrip("=")


def decode_cursor(value: str) -> tuple[int, str]:
    """The (active_at, id) a cursor holds, or 400 InvalidInput for anything we did not hand out."""
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError) as exc:
        raise ApiError("InvalidInput", "参数 cursor 不合法") from exc
    match = _CURSOR.fullmatch(text)
    if match is None:
        raise ApiError("InvalidInput", "参数 cursor 不合法")
    return int(match.group(1)), match.group(2)


class ConversationApi:
    """The user's conversations as the API shows them."""

    def __init__(
        self, settings: Settings, db: Database, roles: RoleCatalog, *, on_removed: Callable[[str], Any] | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.roles = roles
        self.on_removed = on_removed or (lambda uid: None)  # cached audio of removed messages goes too

    def present(self, conversation: Conversation, message_count: int) -> dict[str, Any]:
        """The Conversation object of the API."""
        stored = conversation.settings
        shown = {name: stored.get(name) for name in input.PARAMS}
        shown["thinking_enabled"] = bool(stored.get("thinking_enabled", False))
        shown["model"] = stored.get("model") or self.settings.llm_model
        last = conversation.last_message_at
        return {
            "conversation_id": conversation.id,
            "role_code": conversation.role_code,
            "title": conversation.title,
            "is_default": conversation.is_default,
            "message_count": message_count,
            "created_at": format_time(conversation.created_at, self.settings),
            "updated_at": format_time(conversation.updated_at, self.settings),
            "last_message_at": format_time(last, self.settings) if last is not None else None,
            "settings": shown,
        }

    def create(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/conversations: a new conversation with a role."""
        role = self.roles.get(body.get("role_code"))
        title = input.title(body.get("title"))
        raw_settings = body.get("settings")
        settings = input.conversation_settings(raw_settings, self.settings) if raw_settings is not None else {}
        with self.db.tx() as tx:
            conversation = conversations.create(tx, uid=uid, role_code=role.role_code, title=title, settings=settings)
        return {"success": True, "conversation": self.present(conversation, 0)}

    def list(self, uid: str, args: Any) -> dict[str, Any]:
        """GET /chat/conversations: a page of the user's conversations (with one role, or all)."""
        role_code = args.get("role_code") or None
        if role_code is not None:
            role_code = self.roles.get(role_code).role_code
        limit = input.query_int(args, "limit", low=1, high=PAGE_MAX) or PAGE_DEFAULT
        cursor = args.get("cursor") or None
        before = decode_cursor(cursor) if cursor else None

        def read(tx: Any) -> tuple[list[Conversation], dict[str, int]]:
            page = conversations.list_for_user(tx, uid=uid, role_code=role_code, limit=limit + 1, before=before)
            counts = messages.count_by_conversation(tx, conversation_ids=[c.id for c in page[:limit]])
            return page, counts

        page, counts = self.db.read(read)
        has_more = len(page) > limit
        page = page[:limit]
        return {
            "success": True,
            "conversations": [self.present(c, counts.get(c.id, 0)) for c in page],
            "has_more": has_more,
            "next_cursor": encode_cursor(page[-1]) if has_more else None,
        }

    def show(self, uid: str, args: Any) -> dict[str, Any]:
        """GET /chat/conversation: one conversation."""
        conversation_id = input.conversation_id_of(args.get("conversation_id"))

        def read(tx: Any) -> tuple[Conversation | None, dict[str, int]]:
            found = conversations.get(tx, uid=uid, conversation_id=conversation_id)  # type: ignore[arg-type]
            return found, messages.count_by_conversation(tx, conversation_ids=[found.id] if found else [])

        conversation, counts = self.db.read(read)
        if conversation is None:
            raise ApiError("ConversationNotFound")
        return {"success": True, "conversation": self.present(conversation, counts.get(conversation.id, 0))}

    def update(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/conversation/update: rename it and/or change its settings."""
        conversation_id = input.conversation_id_of(body.get("conversation_id"))
        title = input.title(body.get("title"))
        raw_settings = body.get("settings")
        settings = input.conversation_settings(raw_settings, self.settings) if raw_settings is not None else None
        with self.db.tx() as tx:
            found = conversations.get(tx, uid=uid, conversation_id=conversation_id, lock=True)  # type: ignore[arg-type]
            if found is None:
                raise ApiError("ConversationNotFound")
            updated = conversations.update(tx, conversation=found, title=title, settings=settings)
            count = messages.count_by_conversation(tx, conversation_ids=[found.id]).get(found.id, 0)
        return {"success": True, "conversation": self.present(updated, count)}

    def delete(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/conversation/delete: the conversation and its messages.

        Deleting a role's default conversation empties it for good; the role gets a fresh default one
        the next time the contract's operations use it.
        """
        conversation_id = input.conversation_id_of(body.get("conversation_id"))
        with self.db.tx() as tx:
            found = conversations.get(tx, uid=uid, conversation_id=conversation_id, lock=True)  # type: ignore[arg-type]
            if found is None:
                raise ApiError("ConversationNotFound")
            deleted = messages.clear(tx, conversation_id=found.id)
            conversations.delete(tx, conversation_id=found.id)
        if deleted:
            self.on_removed(uid)
        return {"success": True, "message": "会话已删除", "deleted_count": deleted}
