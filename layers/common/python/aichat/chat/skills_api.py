"""The catalogue of skills and tools, and running a tool by hand (GET /chat/tools, POST /chat/tool/execute …)."""

from __future__ import annotations

import logging
import math
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..store import Database, now_ms
from ..tools import runs
from ..tools.base import ToolContext, ToolError
from ..tools.registry import ToolRegistry
from . import input
from .roles import RoleCatalog

log = logging.getLogger("aichat.chat")


class SkillsApi:
    """What roles can do and which tools this deployment runs."""

    def __init__(self, settings: Settings, db: Database, roles: RoleCatalog, tools: ToolRegistry) -> None:
        self.settings = settings
        self.db = db
        self.roles = roles
        self.tools = tools

    def role_skills(self, args: Any) -> dict[str, Any]:
        """GET /chat/role/skills: the role's skills this deployment can use (its own names for them)."""
        role = self.roles.get(args.get("role_code"))
        skills = []
        for skill in role.skills:
            if not self.tools.available(skill.tool):
                continue
            tool = self.tools.get(skill.tool)
            # `direct`: POST /chat/skill runs it (web search only works inside a chat); `parameters`: the
            # arguments it takes (JSON Schema), so a client knows to ask for a city.
            entry = {**skill.public(), "direct": tool is not None}
            entry["parameters"] = tool.parameters if tool else {"type": "object", "properties": {}}
            skills.append(entry)
        return {"success": True, "role_code": role.role_code, "skills": skills}

    def list(self) -> dict[str, Any]:
        """GET /chat/tools: every tool this deployment runs."""
        return {"success": True, "tools": [tool.public() for tool in self.tools.offered()]}

    def show(self, args: Any) -> dict[str, Any]:
        """GET /chat/tool?name=: one tool."""
        name = args.get("name")
        if not name:
            raise ApiError("InvalidInput", "缺少必填参数 name")
        tool = self.tools.get(name)
        if tool is None:
            raise ApiError("ToolNotFound")
        return {"success": True, "tool": tool.public()}

    def execute(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/tool/execute: run one tool with the given arguments (rate limited per user)."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError("InvalidInput", "缺少必填参数 name")
        tool = self.tools.get(name)
        if tool is None:
            raise ApiError("ToolNotFound")
        args = input.tool_arguments(body, tool.parameters)
        self._count(uid, name)
        try:
            result = self.tools.run_now(name, args, ToolContext(uid=uid))
        except ToolError as exc:
            raise ApiError("ToolFailed", f"工具调用失败：{exc.message}") from exc
        return {"success": True, "result": {"name": name, "display": result.display, "data": result.data}}

    def _count(self, uid: str, name: str) -> None:
        limit = self.settings.tool_execute_per_minute
        with self.db.tx() as tx:
            # The user's row, locked, serialises one user's executions across instances (as chat limits do).
            if tx.one("SELECT uid FROM users WHERE uid = ?" + tx.for_update, (uid,)) is None:
                raise ApiError("Unauthorized")
            now = now_ms()
            seen = runs.window(tx, uid=uid, since_ms=now - runs.MINUTE_MS)
            if seen and seen["n"] >= limit:
                retry = max(1, math.ceil((seen["oldest"] + runs.MINUTE_MS - now) / 1000))
                raise ApiError("RateLimited", "工具调用太频繁，请稍后再试", retry_after=retry)
            runs.add(tx, uid=uid, tool=name, now=now)
