"""POST /chat/skill: one of the role's skills used directly; its tool runs first, then the role answers."""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

from ..errors import ApiError
from ..store import Tx
from . import conversations, input, messages
from .conversations import Conversation
from .idempotency import Replay
from .turn import Turn

if TYPE_CHECKING:
    from .idempotency import Keyed
    from .service import ChatService


def start(service: ChatService, uid: str, body: dict[str, Any], keyed: Keyed) -> Turn | Replay:
    """The checks (400/404 before anything is stored), the user's line, then a turn that runs the tool first."""
    role_code = body.get("role_code")
    if role_code is None or role_code == "":
        raise ApiError("InvalidInput", "缺少必填参数 role_code")
    target = input.target(body)
    role = service.roles.get(role_code)
    skill_code = body.get("skill_code")
    if not isinstance(skill_code, str) or not skill_code:
        raise ApiError("InvalidInput", "缺少必填参数 skill_code")
    skill = role.skill(skill_code)
    if skill is None or not service.tools.available(skill.tool):
        raise ApiError("SkillNotFound")
    tool = service.tools.get(skill.tool)
    if tool is None:  # web search is a flag on the model's request, used as the chat goes
        raise ApiError("InvalidInput", "这个技能会在聊天中自动使用，不能单独调用")
    args = input.tool_arguments(body, tool.parameters)
    overrides = input.turn_overrides(body, service.settings)
    shown = "，".join(str(v) for v in args.values())
    text = f"（使用技能「{skill.name}」{'：' + shown if shown else ''}）"
    call = {
        "id": f"call_{secrets.token_hex(12)}",
        "name": tool.name,
        "arguments": json.dumps(args, ensure_ascii=False),
    }

    def write(tx: Tx, conversation: Conversation) -> tuple[input.TurnInput, int]:
        message_id = messages.add_user_message(
            tx,
            uid=uid,
            role_code=conversation.role_code,
            conversation_id=conversation.id,
            text=text,
            has_image=False,
        )
        conversations.touch(tx, conversation_id=conversation.id, first_text=None if conversation.title else text)
        return input.TurnInput(text=text, image=None, overrides=overrides), message_id

    return service._start(uid, target, write, first_calls=[call], keyed=keyed)
