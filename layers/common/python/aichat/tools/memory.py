"""recall_recent_chats and get_current_time: answered from our own data and clock (no provider)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..store import Database
from .base import ToolContext, ToolError, ToolResult

WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")
GIST_CHARS = 60
RECENT_LIMIT = 5


def recall_recent_chats(db: Database, nickname: Callable[[str], str], tz: ZoneInfo, ctx: ToolContext) -> ToolResult:
    """The roles this user talked with most recently (other conversations than this one), when, and the
    gist of each: the user's own rows only (every query is by uid or by a conversation of that uid)."""
    from ..chat import conversations, messages

    def read(tx):  # type: ignore[no-untyped-def]
        found = []
        for conversation in conversations.recent(tx, uid=ctx.uid, exclude_id=ctx.conversation_id, limit=RECENT_LIMIT):
            rows = messages.latest(tx, conversation_id=conversation.id, limit=2)
            found.append((conversation, rows))
        return found

    chats = []
    for conversation, rows in db.read(read):
        last_user = next((r["content"] for r in rows if r["sender_role"] == "user" and r["content"]), "")
        last_any = next((r["content"] for r in rows if r["content"]), "")
        gist = " ".join((conversation.title or last_user or last_any).split())[:GIST_CHARS]
        at = datetime.fromtimestamp((conversation.last_message_at or 0) / 1000, tz)
        chats.append(
            {
                "role_code": conversation.role_code,
                "role_name": nickname(conversation.role_code),
                "conversation_id": conversation.id,
                "last_message_at": at.replace(tzinfo=None).isoformat(timespec="minutes"),
                "gist": gist,
                "last_message": " ".join(last_any.split())[:GIST_CHARS],
            }
        )
    if not chats:
        return ToolResult({"chats": []}, "最近没有和其他角色聊过")
    names = "、".join(dict.fromkeys(chat["role_name"] for chat in chats))
    return ToolResult({"chats": chats}, f"最近聊过：{names}")


def current_time(default_tz: str, timezone: str | None) -> ToolResult:
    """Date, weekday and time now in a time zone (the service's by default)."""
    name = timezone or default_tz
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolError(f"未知时区：{name}") from exc
    now = datetime.now(tz)
    data = {
        "timezone": name,
        "date": now.date().isoformat(),
        "weekday": WEEKDAYS[now.weekday()],
        "time": now.strftime("%H:%M"),
        "iso": now.isoformat(timespec="seconds"),
    }
    return ToolResult(data, f"{now.month}月{now.day}日 {data['weekday']} {data['time']}")
