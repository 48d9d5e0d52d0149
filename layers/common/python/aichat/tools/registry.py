"""The tools a deployment offers, built from Settings; a tool whose provider is not configured is absent."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Settings
from .base import InvalidArguments, Tool, ToolContext, ToolError, ToolResult, model_content, parse_arguments

if TYPE_CHECKING:
    from ..store import Database

log = logging.getLogger("aichat.tools")

# Every tool name a role's skills may name (whether or not this deployment configures its provider), and
# the request-flag skill.
TOOL_NAMES = ("get_weather", "get_hot_news", "recall_recent_chats", "get_current_time", "web_search")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40, "description": "城市或区县名称，例如“杭州”“北京市朝阳区”"},
    },
    "required": ["city"],
    "additionalProperties": False,
}
NEWS_PARAMETERS = {
    "type": "object",
    "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 20, "description": "返回几条，默认 10"}},
    "additionalProperties": False,
}
RECALL_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {
        "timezone": {
            "type": "string",
            "maxLength": 64,
            "pattern": r"^[A-Za-z_+\-/0-9]+$",
            "description": "IANA 时区名，例如 Asia/Shanghai；默认服务所在时区",
        },
    },
    "additionalProperties": False,
}


@dataclass
class Outcome:
    """One call's end: what the model reads (`content`), what the UI shows, and the trace we store."""

    call_id: str
    name: str
    arguments: str
    ok: bool
    display: str
    content: str
    ms: int

    def trace(self) -> dict[str, Any]:
        """The stored form (and what a client is shown, less `result`)."""
        return {
            "tool_call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "ok": self.ok,
            "display": self.display,
            "ms": self.ms,
            "result": self.content,
        }


class Running:
    """One call in flight: started in the pool, or already decided (bad arguments, unknown tool)."""

    def __init__(self, call_id: str, name: str, arguments: str, display: str) -> None:
        self.call_id = call_id
        self.name = name
        self.arguments = arguments
        self.display = display
        self.started = time.monotonic()
        self.future: Future[ToolResult] | None = None
        self.outcome: Outcome | None = None

    def finish(self, ok: bool, display: str, payload: dict[str, Any], max_chars: int) -> Outcome:
        ms = int((time.monotonic() - self.started) * 1000)
        self.outcome = Outcome(
            self.call_id, self.name, self.arguments, ok, display, model_content(ok, payload, max_chars), ms
        )
        return self.outcome


class ToolRegistry:
    """The configured tools, and running them (each call in a shared pool, with its own timeout)."""

    def __init__(self, settings: Settings, tools: list[Tool]) -> None:
        self.settings = settings
        self.timeout_s = settings.tool_timeout_s
        self.max_chars = settings.tool_output_max_chars
        self._tools = {tool.name: tool for tool in tools}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- the catalogue --------------------------------------------------------------------------------
    def offered(self) -> list[Tool]:
        """Every tool this deployment runs, in a stable order."""
        return [self._tools[name] for name in TOOL_NAMES if name in self._tools]

    def get(self, name: Any) -> Tool | None:
        """The configured tool of this name, or None."""
        return self._tools.get(name) if isinstance(name, str) else None

    def available(self, name: str) -> bool:
        """Whether a skill naming this tool can be used here (web search: when the upstream flag is on)."""
        if name == "web_search":
            return self.settings.llm_search_flag and self.settings.tools_enabled
        return name in self._tools

    # -- running --------------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="tool")
        return self._pool

    def start(self, call_id: str, name: str, arguments: str, ctx: ToolContext, allowed: set[str]) -> Running:
        """Begin one call the model asked for; arguments are checked first (bad ones never reach a tool)."""
        tool = self._tools.get(name) if name in allowed else None
        if tool is None:
            running = Running(call_id, name, arguments, "调用了未知的工具")
            running.finish(False, "未知的工具", {"error": f"unknown tool: {name}"}, self.max_chars)
            return running
        try:
            args = parse_arguments(arguments, tool.parameters)
        except InvalidArguments as exc:
            running = Running(call_id, name, arguments, "工具参数有误")
            running.finish(False, "工具参数有误", {"error": f"invalid arguments: {exc}"}, self.max_chars)
            return running
        running = Running(call_id, name, arguments, tool.starting(args))
        running.future = self._executor().submit(_run, tool, args, ctx)
        return running

    def settle(self, running: Running, *, timed_out: bool = False) -> Outcome:
        """The outcome of a call whose future is done (or whose time is up)."""
        if running.outcome is not None:
            return running.outcome
        assert running.future is not None
        if timed_out and not running.future.done():
            running.future.cancel()
            log.warning("tool timed out", extra={"tool": running.name, "timeout_s": self.timeout_s})
            return running.finish(False, "查询超时了", {"error": "timeout"}, self.max_chars)
        try:
            result = running.future.result(timeout=0)
        except ToolError as exc:
            return running.finish(False, exc.display or "查询失败了", {"error": exc.message}, self.max_chars)
        except Exception:
            log.exception("tool failed", extra={"tool": running.name})
            return running.finish(False, "查询失败了", {"error": "internal error"}, self.max_chars)
        return running.finish(True, result.display, {"data": result.data}, self.max_chars)

    def run_now(self, name: str, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """POST /chat/tool/execute: one call, waited for (bounded by the tool timeout)."""
        tool = self._tools[name]
        future = self._executor().submit(_run, tool, args, ctx)
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError as exc:
            future.cancel()
            raise ToolError("工具响应超时") from exc


def _run(tool: Tool, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return tool.run(args, ctx)


def build_registry(settings: Settings, db: Database, nickname: Callable[[str], str]) -> ToolRegistry:
    """The tools this deployment can run (none when tools are switched off)."""
    from .http import JsonClient

    if not settings.tools_enabled:
        return ToolRegistry(settings, [])
    timeout = settings.tool_timeout_s
    connect = min(3.0, timeout)

    def client(base_url: str, provider: str) -> JsonClient:
        return JsonClient(base_url, provider=provider, connect_timeout_s=connect, read_timeout_s=timeout)

    tools: list[Tool] = []
    weather = None
    if settings.weather_provider == "amap" and settings.amap_key:
        from .weather import AmapWeather

        weather = AmapWeather(client(settings.amap_base_url, "高德"), settings.amap_key)
    elif settings.weather_provider == "qweather" and settings.qweather_key and settings.qweather_base_url:
        from .weather import QWeather

        weather = QWeather(client(settings.qweather_base_url, "和风"), settings.qweather_key)
    if weather is not None:
        tools.append(
            Tool(
                name="get_weather",
                category="weather",
                description="查询中国城市的实时天气和未来几天的天气预报。用户问到天气、气温、下雨、穿衣等时使用。",
                parameters=WEATHER_PARAMETERS,
                run=lambda args, ctx, w=weather: w.weather(args["city"]),
                starting=lambda args: f"正在查询{args['city']}天气…",
            )
        )
    boards = {
        name: client(base, name)
        for name, base in (("baidu", settings.baidu_base_url), ("toutiao", settings.toutiao_base_url))
        if name in settings.news_sources and base
    }
    if boards:
        from .news import HotNews

        news = HotNews(boards, cache_s=settings.news_cache_s, fetch_timeout_s=min(3.0, timeout))
        tools.append(
            Tool(
                name="get_hot_news",
                category="news",
                description="获取当前中文互联网的热搜话题（百度热搜、今日头条热榜）。用户问最近有什么新闻、热点、八卦时使用。",
                parameters=NEWS_PARAMETERS,
                run=lambda args, ctx: news.hot_news(args.get("limit", 10)),
                starting=lambda args: "正在看看热搜…",
            )
        )
    from .memory import current_time, recall_recent_chats

    tools.append(
        Tool(
            name="recall_recent_chats",
            category="memory",
            description="查看用户最近和哪些角色聊过天、什么时候、聊了什么。用户问“我上次跟谁聊的”之类时使用。",
            parameters=RECALL_PARAMETERS,
            run=lambda args, ctx: recall_recent_chats(db, nickname, settings.tz, ctx),
            starting=lambda args: "正在回想最近的聊天…",
        )
    )
    tools.append(
        Tool(
            name="get_current_time",
            category="time",
            description="获取现在的日期、星期和时间。用户问今天几号、星期几、现在几点时使用。",
            parameters=TIME_PARAMETERS,
            run=lambda args, ctx: current_time(settings.timezone, args.get("timezone")),
            starting=lambda args: "正在看看时间…",
        )
    )
    return ToolRegistry(settings, tools)
