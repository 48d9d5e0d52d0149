"""What a reply is made of as it streams, and the frames a client gets (pure: no I/O).

Every frame a client gets (but `[DONE]`) follows the contract's client rule: a `chat.completion.chunk` whose
`choices[0].delta.content` is a string. Upstream frames that already do are forwarded byte for byte;
others are rebuilt (content null → "", reasoning kept in its own field, tool-call deltas never shown) or
dropped (a usage-only frame: its usage is folded into the last frame).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..sse import data_frame, encode

FALLBACK_MESSAGES = {
    "NetworkError": "上游模型连接中断",
    "UpstreamHTTPError": "上游模型返回了无法解析的数据",
    "DatabaseError": "回复保存失败",
    "InternalError": "服务内部异常",
}
# Bounds on what one round's tool calls may make us hold.
MAX_CALLS_PER_ROUND = 8
MAX_ARGUMENT_CHARS = 16_384
# Top-level keys of an upstream frame that must not reach the client as they are.
_REBUILT_KEYS = ("choices", "usage", "error", "x_event")


@dataclass
class Reply:
    """What the upstream has delivered so far: content and reasoning kept apart, usage, how it finished."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    model: str | None = None
    chars: int = 0  # len(text), kept as frames arrive (the bounds are checked on every frame)
    round_usage: dict[str, Any] | None = None
    past_usage: list[dict[str, Any]] = field(default_factory=list)
    # The tool calls of the current round as they stream in, by index: {"id", "name", "arguments"}.
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    # The tools that ran for this reply (what is stored with it and replayed into later context).
    tools: list[dict[str, Any]] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, Any] | None:
        """The reply's usage: the upstream's own object for one round, the sums over several."""
        parts = [*self.past_usage, *([self.round_usage] if self.round_usage else [])]
        if len(parts) <= 1:
            return parts[0] if parts else None
        keys = ("prompt_tokens", "completion_tokens", "total_tokens")
        return {key: sum(p.get(key) or 0 for p in parts if isinstance(p.get(key) or 0, int)) for key in keys}

    def next_round(self) -> None:
        """A tool round ended: keep its usage, forget its calls and finish reason."""
        if self.round_usage:
            self.past_usage.append(self.round_usage)
        self.round_usage = None
        self.calls = {}
        self.finish_reason = None

    @property
    def text(self) -> str:
        """The reply's text so far."""
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str | None:
        """The model's reasoning so far, if it reasoned."""
        return "".join(self.reasoning) or None

    def add(self, frame: dict[str, Any]) -> None:
        """Take in one upstream chunk."""
        if isinstance(frame.get("usage"), dict):
            self.round_usage = frame["usage"]
        if isinstance(frame.get("model"), str):
            self.model = frame["model"]
        choices = frame.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices[:1]:  # we never ask for n > 1
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
                self.chars += len(delta["content"])
            if isinstance(delta.get("reasoning_content"), str):
                self.reasoning.append(delta["reasoning_content"])
            if isinstance(delta.get("tool_calls"), list):
                self._add_calls(delta["tool_calls"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def _add_calls(self, parts: list[Any]) -> None:
        """Accumulate streamed tool calls the way DashScope sends them: the first chunk of a call carries
        its id, type and name; later ones an empty id, no name, and pieces of the arguments; by index."""
        for position, part in enumerate(parts):
            if not isinstance(part, dict):
                continue
            index = part.get("index") if isinstance(part.get("index"), int) else position
            if index not in self.calls and len(self.calls) >= MAX_CALLS_PER_ROUND:
                continue
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(part.get("id"), str) and part["id"]:
                call["id"] = part["id"]
            function = part.get("function") if isinstance(part.get("function"), dict) else {}
            if isinstance(function.get("name"), str) and function["name"] and not call["name"]:
                call["name"] = function["name"]
            if isinstance(function.get("arguments"), str) and len(call["arguments"]) < MAX_ARGUMENT_CHARS:
                call["arguments"] += function["arguments"]

    def round_calls(self) -> list[dict[str, Any]]:
        """The calls the model made this round, in index order, each with an id (one is made up if the
        upstream sent none)."""
        calls = []
        for index in sorted(self.calls):
            call = dict(self.calls[index])
            call["id"] = call["id"] or f"call_{uuid.uuid4().hex[:24]}"
            calls.append(call)
        return calls


def client_frame(frame: dict[str, Any], payload: bytes) -> bytes | None:
    """The SSE event a client gets for one upstream chunk, or None when the chunk carries nothing for it."""
    choices = frame.get("choices")
    first = choices[0] if type(choices) is list and choices else None
    delta = first.get("delta") if type(first) is dict else None
    if (
        type(delta) is dict
        and type(delta.get("content")) is str
        and "tool_calls" not in delta
        and first.get("finish_reason") != "tool_calls"
        and frame.get("usage") is None
        and "error" not in frame
        and "x_event" not in frame
        and b"\n" not in payload
        and b"\r" not in payload
    ):
        return data_frame(payload)  # the common case: already what the rule asks, forwarded as it came
    delta = delta if type(delta) is dict else {}
    text = delta.get("content") if type(delta.get("content")) is str else ""
    reasoning = delta.get("reasoning_content") if type(delta.get("reasoning_content")) is str else None
    finish_reason = first.get("finish_reason") if type(first) is dict else None
    if finish_reason == "tool_calls":
        finish_reason = None  # the reply goes on after the tools: a client must not take this for its end
    if not text and not reasoning and not finish_reason:
        return None
    out_delta: dict[str, Any] = {"content": text}
    if reasoning:
        out_delta["reasoning_content"] = reasoning
    out = {key: value for key, value in frame.items() if key not in _REBUILT_KEYS}
    out["object"] = "chat.completion.chunk"
    out["choices"] = [{"index": 0, "delta": out_delta, "finish_reason": finish_reason}]
    return encode(out)


def local_frame(model: str, *, finish_reason: str | None = None, **extra: Any) -> bytes:
    """A frame of our own (no text): the chunk shape, plus what `extra` adds at the top level."""
    frame = {
        "id": f"local-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": finish_reason}],
        **extra,
    }
    return encode(frame)
