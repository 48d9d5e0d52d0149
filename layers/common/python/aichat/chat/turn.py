"""The turn engine: the rounds of one reply, which frames reach the client, and the outcome.

Every frame it emits (but `[DONE]`) follows the contract's client rule: a `chat.completion.chunk` whose
`choices[0].delta.content` is a string. Upstream frames that already do are forwarded byte for byte;
others are rebuilt (content null → "", reasoning kept in its own field, tool-call deltas never shown) or
dropped (a usage-only frame: its usage is folded into the last frame). What else a client may want to
know travels in one top-level `x_event` object: `stream.meta` first, `done` last, `error` on the fallback.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ApiError
from ..llm import StreamBroken, UpstreamStream
from ..sse import DONE_FRAME, data_frame, encode

log = logging.getLogger("aichat.chat.turn")

FALLBACK_MESSAGES = {
    "NetworkError": "上游模型连接中断",
    "UpstreamHTTPError": "上游模型返回了无法解析的数据",
    "DatabaseError": "回复保存失败",
    "InternalError": "服务内部异常",
}
# Top-level keys of an upstream frame that must not reach the client as they are.
_REBUILT_KEYS = ("choices", "usage", "error", "x_event")


@dataclass
class Reply:
    """What the upstream has delivered so far: content and reasoning kept apart, usage, how it finished."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    model: str | None = None

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
            self.usage = frame["usage"]
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
            if isinstance(delta.get("reasoning_content"), str):
                self.reasoning.append(delta["reasoning_content"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])


def client_frame(frame: dict[str, Any], payload: bytes) -> bytes | None:
    """The SSE event a client gets for one upstream chunk, or None when the chunk carries nothing for it."""
    choices = frame.get("choices")
    first = choices[0] if type(choices) is list and choices else None
    delta = first.get("delta") if type(first) is dict else None
    if (
        type(delta) is dict
        and type(delta.get("content")) is str
        and "tool_calls" not in delta
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


class Turn:
    """One reply: reads the upstream round(s), emits the client's frames, stores the reply, reports the outcome.

    `save(reply, partial)` stores the reply and returns its id (None when nothing was stored); `on_close`
    callbacks run once when the turn is closed, however it ended (the stream slot is released there).
    """

    def __init__(
        self,
        *,
        upstream: UpstreamStream,
        model: str,
        meta: dict[str, Any],
        save: Callable[[Reply, bool], int | None],
        on_close: list[Callable[[], None]],
    ) -> None:
        self.upstream = upstream
        self.model = model
        self.meta = meta
        self._save = save
        self._on_close = on_close
        self.reply = Reply()
        self.message_id: int | None = None
        self.error_code: str | None = None
        self.outcome = "client_gone"
        self.client_gone = False
        self._saved = False
        self._closed = False

    def frames(self) -> Iterator[bytes]:
        """The whole SSE body: the meta frame, the reply's frames, the last frame, `[DONE]`."""
        yield local_frame(self.model, x_event={"type": "stream.meta", **self.meta})
        try:
            try:
                yield from self._round(self.upstream)
            except StreamBroken as exc:
                if self.client_gone:
                    return  # we cut the upstream ourselves: nobody is left to tell; close() keeps what arrived
                self.outcome = f"broken:{exc.code}"
                log.warning("upstream stream broke", extra={"reason": exc.reason, "chars": len(self.reply.text)})
                self._store(partial=True)
                yield self._fallback(exc.code)
                return
            # Stored before [DONE]: a client that refreshes history on [DONE] must see the reply.
            self._store(partial=False)
            self.outcome = "complete"
            usage = self.reply.usage
            finish_reason = self.reply.finish_reason or "stop"
            done = {"type": "done", "message_id": self.message_id, "conversation_id": self.meta.get("conversation_id")}
            done.update(finish_reason=finish_reason, usage=usage)
            extra: dict[str, Any] = {"usage": usage} if usage else {}
            yield local_frame(self.reply.model or self.model, finish_reason=finish_reason, **extra, x_event=done)
            yield DONE_FRAME
        except ApiError as exc:
            # Storing the reply failed after the stream started: report it in-band.
            self.outcome = f"error:{exc.code}"
            yield self._fallback(exc.code)

    def _round(self, upstream: UpstreamStream) -> Iterator[bytes]:
        for payload in upstream.frames():
            try:
                frame = json.loads(payload)
            except ValueError as exc:
                raise StreamBroken("UpstreamHTTPError", "malformed upstream frame") from exc
            if not isinstance(frame, dict):
                raise StreamBroken("UpstreamHTTPError", "upstream frame is not an object")
            if frame.get("error") and not frame.get("choices"):
                raise StreamBroken("UpstreamHTTPError", "upstream reported an error mid-stream")
            self.reply.add(frame)
            out = client_frame(frame, payload)
            if out is not None:
                yield out
        if not (upstream.done or self.reply.finish_reason):
            raise StreamBroken("NetworkError", "upstream ended before finishing")

    def _fallback(self, code: str) -> bytes:
        """The last frame when the reply could not be completed: the error, and no text of its own.

        The text a client concatenated so far is exactly what was stored (as a partial reply).
        """
        self.error_code = code
        message = FALLBACK_MESSAGES.get(code, FALLBACK_MESSAGES["InternalError"])
        event = {"type": "error", "code": code, "message": message, "message_id": self.message_id}
        event["conversation_id"] = self.meta.get("conversation_id")
        return local_frame(
            self.model, finish_reason="error", error={"code": code, "message": message}, x_event=event
        ) + (DONE_FRAME)

    def _store(self, *, partial: bool) -> None:
        self._saved = True
        if partial and not self.reply.text and not self.reply.reasoning_text:
            return  # nothing arrived: an empty bubble would only confuse the history
        self.message_id = self._save(self.reply, partial)

    def abort(self) -> None:
        """The client hung up (called from another thread): cut the upstream so a blocked read returns now."""
        self.client_gone = True
        self.upstream.abort()

    def close(self) -> None:
        """End the turn however it went; idempotent. Keeps what arrived if it was never stored."""
        if self._closed:
            return
        self._closed = True
        try:
            self.upstream.close()
            if not self._saved:
                try:
                    self._store(partial=True)
                except ApiError:
                    log.error("could not store a partial reply")
        finally:
            for callback in self._on_close:
                callback()
