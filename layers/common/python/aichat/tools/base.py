"""What a tool is: its description for the model and the catalogue, its arguments' schema, its run."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A role skill that is a request flag of the upstream (DashScope's enable_search), not a function we run.
WEB_SEARCH = "web_search"


class ToolError(Exception):
    """A tool could not answer; `message` is what the model (and a direct caller) is told."""

    def __init__(self, message: str, *, display: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.display = display


@dataclass(frozen=True)
class ToolContext:
    """Who a tool runs for (tools that read user data answer only about this user)."""

    uid: str
    conversation_id: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered: data for the model and a short Chinese line for the UI."""

    data: dict[str, Any]
    display: str


@dataclass(frozen=True)
class Tool:
    """One function the model may call (OpenAI-compatible `tools` entry) and how it runs."""

    name: str
    category: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], ToolContext], ToolResult] = field(repr=False, compare=False)
    starting: Callable[[dict[str, Any]], str] = field(repr=False, compare=False)

    def spec(self) -> dict[str, Any]:
        """The `tools` entry the upstream is sent."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def public(self) -> dict[str, Any]:
        """What GET /chat/tools shows of it."""
        return {
            "name": self.name,
            "category": self.category,
            "description": self.description,
            "parameters": self.parameters,
        }


class InvalidArguments(ValueError):
    """Arguments that do not match a tool's schema; the message names the field."""


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
}


def parse_arguments(raw: str | dict[str, Any] | None, schema: dict[str, Any]) -> dict[str, Any]:
    """The arguments as an object checked against the tool's schema (the subset our tools use: an object
    of typed properties with `required`, `enum`, `minimum`/`maximum`, `maxLength`, `pattern`, no extras)."""
    if raw is None or raw == "":
        args: Any = {}
    elif isinstance(raw, str):
        try:
            args = json.loads(raw)
        except ValueError as exc:
            raise InvalidArguments("arguments 不是合法的 JSON") from exc
    else:
        args = raw
    if not isinstance(args, dict):
        raise InvalidArguments("arguments 必须是 JSON 对象")
    properties: dict[str, Any] = schema.get("properties", {})
    for name in schema.get("required", []):
        if args.get(name) in (None, ""):
            raise InvalidArguments(f"缺少参数 {name}")
    unknown = sorted(set(args) - set(properties))
    if unknown and schema.get("additionalProperties") is False:
        raise InvalidArguments(f"未知参数 {unknown[0]}")
    checked: dict[str, Any] = {}
    for name, value in args.items():
        if name not in properties or value is None:
            continue
        rule = properties[name]
        if not _TYPES[rule["type"]](value):
            raise InvalidArguments(f"参数 {name} 必须是 {rule['type']}")
        if "enum" in rule and value not in rule["enum"]:
            raise InvalidArguments(f"参数 {name} 必须是 {', '.join(map(str, rule['enum']))} 之一")
        if ("minimum" in rule and value < rule["minimum"]) or ("maximum" in rule and value > rule["maximum"]):
            raise InvalidArguments(f"参数 {name} 超出范围 {rule.get('minimum')}–{rule.get('maximum')}")
        if isinstance(value, str):
            value = value.strip()
            if len(value) > rule.get("maxLength", 200):
                raise InvalidArguments(f"参数 {name} 过长")
            if "pattern" in rule and not re.fullmatch(rule["pattern"], value):
                raise InvalidArguments(f"参数 {name} 格式不正确")
        checked[name] = value
    return checked


def model_content(ok: bool, payload: dict[str, Any], max_chars: int) -> str:
    """A tool result as the model reads it: JSON data, marked as such, capped in size."""
    body = {"ok": ok, **payload}
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if len(text) > max_chars:
        text = text[: max(0, max_chars - 12)] + "…[truncated]"
    return text
