"""What a turn asks the model: the conversation's settings overridden by the turn's, the context within its
budget, the role's tools and DashScope's switches (pure: no I/O)."""

from __future__ import annotations

from typing import Any

from ..config import Settings
from ..tools.base import WEB_SEARCH
from ..tools.registry import ToolRegistry
from . import input
from .context import build_messages, user_turn
from .conversations import Conversation
from .roles import Role
from .tooluse import TOOL_GUIDANCE


def allowed_tools(tools: ToolRegistry, role: Role, turn: input.TurnInput) -> set[str]:
    """The tools the role's skills offer on this turn (none on an image turn: the vision model is another
    family, and function calling is not documented for it)."""
    if turn.image is not None:
        return set()
    return {skill.tool for skill in role.skills if tools.get(skill.tool) is not None}


def build(
    s: Settings,
    tools: ToolRegistry,
    role: Role,
    conversation: Conversation,
    turn: input.TurnInput,
    history: list[dict[str, Any]],
    allowed: set[str],
) -> dict[str, Any]:
    """The upstream request body."""
    effective = {**conversation.settings, **turn.overrides}
    params = {name: effective[name] for name in input.PARAMS if effective.get(name) is not None}
    model = s.llm_vision_model if turn.image else (effective.get("model") or s.llm_model)
    payload: dict[str, Any] = {
        "model": model,
        "messages": build_messages(
            system_prompt=role.system_prompt + (TOOL_GUIDANCE if allowed else ""),
            opening_message=role.opening_message,
            history=history,
            turn=user_turn(turn.text, turn.image),
            context_tokens=s.context_tokens,
            reserve_tokens=params.get("max_tokens") or s.reply_reserve_tokens,
            with_tools=bool(allowed),
        ),
        **params,
    }
    if allowed:
        payload["tools"] = [tool.spec() for tool in tools.offered() if tool.name in allowed]
        payload["parallel_tool_calls"] = True
    searches = any(skill.tool == WEB_SEARCH for skill in role.skills) and tools.available(WEB_SEARCH)
    if searches and not turn.image:
        # DashScope searches the web itself when the model needs it (a request flag, not a tool we run).
        payload["enable_search"] = True
        payload["search_options"] = {"search_strategy": s.search_strategy}
    if s.llm_thinking_flag and not turn.image:
        # DashScope's switch for Qwen3 hybrid thinking models; sent explicitly so "off" means off. Not on an
        # image turn: the vision model is another family, and the switch is not documented for it.
        payload["enable_thinking"] = bool(effective.get("thinking_enabled"))
    if s.llm_include_usage:
        payload["stream_options"] = {"include_usage": True}
    return payload
