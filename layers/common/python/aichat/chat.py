"""ChatService's logic: request validation, context assembly, the SSE relay with persistence, history, clear."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from .config import Settings
from .disconnect import watcher
from .errors import ApiError
from .llm import LlmClient, StreamBroken, UpstreamStream
from .roles import Role, RoleCatalog
from .store import Database, Row, Tx, now_ms
from .web import log_access

log = logging.getLogger("aichat.chat")

DONE_FRAME = b"data: [DONE]\n\n"
DATA_URL_PREFIX = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)
WHITESPACE = re.compile(rb"\s+")
# Magic bytes decide the image type; the client's image_mime_type is only a hint.
IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
# Sampling parameters: name -> (type check, inclusive low, high, low exclusive?).
PARAMS: dict[str, tuple[type, float, float, bool]] = {
    "temperature": (float, 0.0, 2.0, False),
    "top_p": (float, 0.0, 1.0, True),
    "max_tokens": (int, 1, 8192, False),
    "presence_penalty": (float, -2.0, 2.0, False),
    "frequency_penalty": (float, -2.0, 2.0, False),
}
FALLBACK_TEXT = "（网络开小差了，回复没能说完，请稍后再试。）"
FALLBACK_MESSAGES = {
    "NetworkError": "上游模型连接中断",
    "UpstreamHTTPError": "上游模型返回了无法解析的数据",
    "DatabaseError": "回复保存失败",
    "InternalError": "服务内部异常",
}
IMAGE_ONLY_PLACEHOLDER = "[图片]"
MINUTE_MS = 60_000
HISTORY_PAGE_DEFAULT = 50
HISTORY_PAGE_MAX = 200
MAX_ID = 2**63 - 1  # BIGINT / SQLite INTEGER
# Chat templates wrap each message in a few tokens of markup.
MESSAGE_OVERHEAD_TOKENS = 4
# What a vision model charges for an image varies with its size; this is a safe middle estimate.
IMAGE_TOKENS = 1024
# A client over the concurrent-stream limit can retry as soon as one of its streams ends.
STREAM_RETRY_AFTER_S = 3


@dataclass(frozen=True)
class ChatImage:
    """A validated image: its type by magic bytes and its canonical base64."""

    mime_type: str
    base64_data: str
    size: int

    @property
    def data_url(self) -> str:
        """The `data:` URL an OpenAI-compatible vision model takes."""
        return f"data:{self.mime_type};base64,{self.base64_data}"


@dataclass(frozen=True)
class ChatRequest:
    """A validated /chat/stream request."""

    role: Role
    text: str
    image: ChatImage | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """What an upstream stream has delivered so far: content and reasoning kept apart, and usage."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None

    def add(self, frame: dict[str, Any]) -> bool:
        """Take in one chunk; return whether it finished a choice (a finish_reason)."""
        finished = False
        if isinstance(frame.get("usage"), dict):
            self.usage = frame["usage"]
        for choice in frame.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            if isinstance(delta.get("reasoning_content"), str):
                self.reasoning.append(delta["reasoning_content"])
            finished = finished or bool(choice.get("finish_reason"))
        return finished


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate suited to Qwen-style vocabularies: about one token per CJK character
    (and other non-ASCII symbols such as emoji) and one per four ASCII characters, rounded up."""
    wide = sum(1 for ch in text if ord(ch) > 0x7F)
    return wide + -(-(len(text) - wide) // 4)


def message_tokens(message: dict[str, Any]) -> int:
    """Estimated tokens of one chat message, with the per-message overhead of the chat template."""
    content = message["content"]
    if isinstance(content, str):
        return MESSAGE_OVERHEAD_TOKENS + estimate_tokens(content)
    total = MESSAGE_OVERHEAD_TOKENS
    for part in content:
        total += estimate_tokens(part.get("text", "")) if part.get("type") == "text" else IMAGE_TOKENS
    return total


def _query_int(args: Any, name: str, *, low: int, high: int) -> int | None:
    """An optional integer query parameter within [low, high], else 400 InvalidInput."""
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError("InvalidInput", f"参数 {name} 必须是 {low} 到 {high} 之间的整数")
    return int(raw)


def _nothing() -> None:
    return None


def _integer(value: Any) -> int | None:
    """A JSON integer (5 or 5.0, as JSON Schema counts them), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def sniff_image_type(data: bytes) -> str | None:
    """The image MIME type by magic bytes, or None if it is not an allowed image."""
    for signature, mime_type in IMAGE_SIGNATURES:
        if data.startswith(signature):
            return mime_type
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def format_time(ms: int, settings: Settings) -> str:
    """`YYYY-MM-DDTHH:MM:SS` in the configured time zone, as the contract shows."""
    return datetime.fromtimestamp(ms // 1000, settings.tz).replace(tzinfo=None).isoformat()


def fallback_frame(code: str) -> bytes:
    """The local frame sent when the upstream fails mid-stream: the chunk shape plus an error object."""
    frame = {
        "id": f"local-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "local-fallback",
        "choices": [{"index": 0, "delta": {"content": FALLBACK_TEXT}, "finish_reason": "error"}],
        "error": {"code": code, "message": FALLBACK_MESSAGES.get(code, FALLBACK_MESSAGES["InternalError"])},
    }
    return b"data: " + json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class Chat:
    """Conversations of (user, role): streaming replies, history and clearing."""

    def __init__(self, settings: Settings, db: Database, roles: RoleCatalog, llm: LlmClient) -> None:
        self.settings = settings
        self.db = db
        self.roles = roles
        self.llm = llm

    # -- validation --------------------------------------------------------------------------------
    def parse(self, body: dict[str, Any]) -> ChatRequest:
        """Validate a /chat/stream body in the contract's order, raising the documented errors."""
        role = self.roles.get(body.get("role_code"))
        text = self._text(body)
        raw_image = body.get("image_base64")
        if raw_image is not None and not isinstance(raw_image, str):
            raise ApiError("InvalidImage", "image_base64 必须是字符串")
        if not text.strip() and not raw_image:
            raise ApiError("InvalidInput", "缺少 message 或 image_base64")
        params = self._params(body)
        mime_hint = body.get("image_mime_type")
        if mime_hint is not None and not isinstance(mime_hint, str):
            raise ApiError("InvalidInput", "参数 image_mime_type 必须是字符串")
        image = self._image(raw_image) if raw_image else None
        return ChatRequest(role=role, text=text, image=image, params=params)

    def _text(self, body: dict[str, Any]) -> str:
        # `message` wins; `prompt` is the legacy name for the same thing.
        for name in ("message", "prompt"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ApiError("InvalidInput", f"参数 {name} 必须是字符串")
            if value.strip():
                if len(value) > self.settings.message_max_chars:
                    raise ApiError("InvalidInput", f"消息不能超过 {self.settings.message_max_chars} 个字符")
                return value
        return ""

    @staticmethod
    def _params(body: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, (kind, low, high, low_exclusive) in PARAMS.items():
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError("InvalidInput", f"参数 {name} 类型不正确")
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise ApiError("InvalidInput", f"参数 {name} 类型不正确")
                if kind is int:
                    if not value.is_integer():  # JSON Schema counts 5.0 as an integer; 5.5 is not
                        raise ApiError("InvalidInput", f"参数 {name} 必须是整数")
                    value = int(value)
            # Compared as Python numbers: a 400-digit integer is simply out of range (no float overflow).
            if value > high or value < low or (low_exclusive and value == low):
                raise ApiError("InvalidInput", f"参数 {name} 超出范围")
            params[name] = value
        return params

    def _image(self, raw: str) -> ChatImage:
        text = DATA_URL_PREFIX.sub("", raw.strip(), count=1)
        data = WHITESPACE.sub(b"", text.encode("ascii", errors="replace"))
        # Check the size before decoding so an oversized upload costs no memory beyond its body.
        if len(data) * 3 // 4 > self.settings.image_max_bytes + 2:
            raise ApiError("InvalidImage", f"图片不能超过 {self.settings.image_max_bytes // (1024 * 1024)} MiB")
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError("InvalidImage") from exc
        if not decoded or len(decoded) > self.settings.image_max_bytes:
            raise ApiError("InvalidImage")
        mime_type = sniff_image_type(decoded)
        if mime_type is None:
            raise ApiError("InvalidImage", "图片格式不支持，仅支持 jpeg/png/webp/gif")
        return ChatImage(mime_type=mime_type, base64_data=data.decode("ascii"), size=len(decoded))

    # -- streaming ---------------------------------------------------------------------------------
    def stream(self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None) -> StreamRelay:
        """POST /chat/stream: validate, enforce limits, store the message, open the upstream, relay it.

        Errors before the first frame are raised as ApiError (JSON responses); after that, the relay
        reports them in-band.
        """
        request = self.parse(body)
        write = partial(self._append_user_message, uid=uid, request=request)
        return self._start("chat_stream", uid, request, write, client)

    def regenerate(self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None) -> StreamRelay:
        """POST /chat/regenerate: answer the last user message again, replacing the reply after it."""
        role = self.roles.get(body.get("role_code"))
        request = ChatRequest(role=role, text="", image=None, params=self._params(body))
        write = partial(self._rewind, uid=uid, request=request, message_id=None, new=None)
        return self._start("chat_regenerate", uid, request, write, client)

    def edit(self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None) -> StreamRelay:
        """POST /chat/edit: replace the last user message's text (and image), then regenerate the reply."""
        request = self.parse(body)
        message_id = _integer(body.get("message_id"))
        if body.get("message_id") is not None and (message_id is None or not 1 <= message_id <= MAX_ID):
            raise ApiError("InvalidInput", "参数 message_id 必须是最后一条用户消息的 id")
        write = partial(self._rewind, uid=uid, request=request, message_id=message_id, new=request)
        return self._start("chat_edit", uid, request, write, client)

    def _start(
        self,
        operation_id: str,
        uid: str,
        request: ChatRequest,
        write: Callable[[Tx], tuple[ChatRequest, int]],
        client: socket.socket | None,
    ) -> StreamRelay:
        """Common path of every streamed reply: limits, the conversation write, the upstream, the relay."""
        started = time.perf_counter()
        if not self.llm.api_key:
            raise ApiError("MissingApiKey")
        with self.db.tx() as tx:
            slot_id = self._take_slot(tx, uid)
            turn, message_id = write(tx)
            history = tx.all(
                "SELECT sender_role, content, has_image FROM messages WHERE uid = ? AND role_code = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?",
                (uid, request.role.role_code, message_id, self.settings.history_max_messages),
            )
        history.reverse()
        payload: dict[str, Any] = {
            "model": self.settings.llm_vision_model if turn.image else self.settings.llm_model,
            "messages": self.build_messages(turn, history),
            **turn.params,
        }
        if self.settings.llm_include_usage:
            payload["stream_options"] = {"include_usage": True}
        try:
            upstream = self.llm.open_stream(payload)
        except BaseException:
            self.release_slot(slot_id)
            raise
        log.info(
            "stream opened",
            extra={"uid": uid, "role_code": turn.role.role_code, "message_id": message_id, "model": payload["model"]},
        )
        return StreamRelay(
            self,
            uid=uid,
            role_code=turn.role.role_code,
            upstream=upstream,
            slot_id=slot_id,
            started=started,
            client=client,
            operation_id=operation_id,
        )

    def _take_slot(self, tx: Tx, uid: str) -> int:
        """Enforce the user's rate limits, count this message and take a stream slot (inside the caller's tx)."""
        s = self.settings
        now = now_ms()
        # Lock the user's row so one user's concurrent requests are counted one at a time.
        tx.one("SELECT uid FROM users WHERE uid = ?" + tx.for_update, (uid,))
        tx.execute("DELETE FROM stream_slots WHERE uid = ? AND expires_at <= ?", (uid, now))
        open_streams = tx.one("SELECT COUNT(*) AS n FROM stream_slots WHERE uid = ?", (uid,))
        if open_streams and open_streams["n"] >= s.chat_max_concurrent_streams:
            raise ApiError("RateLimited", "同时进行的对话过多，请等当前回复结束", retry_after=STREAM_RETRY_AFTER_S)
        window = tx.one(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM chat_events WHERE uid = ? AND created_at > ?",
            (uid, now - MINUTE_MS),
        )
        if window and window["n"] >= s.chat_messages_per_minute:
            retry = -(-(window["oldest"] + MINUTE_MS - now) // 1000)
            raise ApiError("RateLimited", "发送太快了，请稍后再试", retry_after=max(1, retry))
        # Events older than the window are never read again; trimming here keeps the table small.
        tx.execute("DELETE FROM chat_events WHERE uid = ? AND created_at <= ?", (uid, now - MINUTE_MS))
        tx.insert("INSERT INTO chat_events (uid, created_at) VALUES (?, ?)", (uid, now))
        return tx.insert(
            "INSERT INTO stream_slots (uid, expires_at) VALUES (?, ?)", (uid, now + s.stream_lease_s * 1000)
        )

    def _append_user_message(self, tx: Tx, uid: str, request: ChatRequest) -> tuple[ChatRequest, int]:
        message_id = tx.insert(
            "INSERT INTO messages (uid, role_code, sender_role, content, has_image, is_partial, created_at)"
            " VALUES (?, ?, 'user', ?, ?, 0, ?)",
            (uid, request.role.role_code, request.text, int(request.image is not None), now_ms()),
        )
        return request, message_id

    def _rewind(
        self, tx: Tx, uid: str, request: ChatRequest, *, message_id: int | None, new: ChatRequest | None
    ) -> tuple[ChatRequest, int]:
        """Drop the replies after the conversation's last user message (editing it first if `new`)."""
        last = tx.one(
            "SELECT id, content, has_image FROM messages WHERE uid = ? AND role_code = ? AND sender_role = 'user'"
            " ORDER BY id DESC LIMIT 1" + tx.for_update,
            (uid, request.role.role_code),
        )
        if last is None:
            raise ApiError("InvalidInput", "当前会话还没有可以重新生成的消息")
        if message_id is not None and message_id != last["id"]:
            raise ApiError("InvalidInput", "只能编辑最后一条用户消息")
        tx.execute(
            "DELETE FROM messages WHERE uid = ? AND role_code = ? AND id > ?",
            (uid, request.role.role_code, last["id"]),
        )
        if new is not None:
            tx.execute(
                "UPDATE messages SET content = ?, has_image = ?, created_at = ? WHERE id = ?",
                (new.text, int(new.image is not None), now_ms(), last["id"]),
            )
            return new, last["id"]
        # The image itself is never stored, so a regenerated turn carries its text (or a placeholder).
        text = last["content"] or (IMAGE_ONLY_PLACEHOLDER if last["has_image"] else "")
        return ChatRequest(role=request.role, text=text, image=None, params=request.params), last["id"]

    def release_slot(self, slot_id: int) -> None:
        """Free a stream slot; if the database is down the lease frees it later."""
        try:
            with self.db.tx() as tx:
                tx.execute("DELETE FROM stream_slots WHERE id = ?", (slot_id,))
        except ApiError:
            log.error("could not release a stream slot", extra={"slot_id": slot_id})

    def build_messages(self, request: ChatRequest, history: list[Row]) -> list[dict[str, Any]]:
        """The upstream context within the token budget.

        Always: the role's hidden prompt (one system message), its opening message (what the user saw
        first), and the new turn. Then as many of the newest history messages as fit in what is left
        after reserving room for the reply (`max_tokens`, or the configured reserve).
        """
        role = request.role
        head: list[dict[str, Any]] = [{"role": "system", "content": role.system_prompt}]
        if role.opening_message:
            head.append({"role": "assistant", "content": role.opening_message})
        if request.image is None:
            turn: dict[str, Any] = {"role": "user", "content": request.text}
        else:
            parts: list[dict[str, Any]] = []
            if request.text.strip():
                parts.append({"type": "text", "text": request.text})
            parts.append({"type": "image_url", "image_url": {"url": request.image.data_url}})
            turn = {"role": "user", "content": parts}
        reserve = request.params.get("max_tokens") or self.settings.reply_reserve_tokens
        budget = self.settings.context_tokens - reserve - sum(message_tokens(m) for m in (*head, turn))
        picked: list[dict[str, Any]] = []
        for row in reversed(history):  # newest first, so the budget keeps the most recent turns
            content = row["content"] or (IMAGE_ONLY_PLACEHOLDER if row["has_image"] else "")
            if not content:
                continue
            message = {"role": "assistant" if row["sender_role"] == "assistant" else "user", "content": content}
            cost = message_tokens(message)
            if cost > budget:
                break
            budget -= cost
            picked.append(message)
        picked.reverse()
        return [*head, *picked, turn]

    def save_reply(self, uid: str, role_code: str, reply: Reply, *, partial: bool) -> None:
        """Store an assistant reply with its usage and reasoning (a partial one only if something arrived)."""
        content = "".join(reply.content)
        reasoning = "".join(reply.reasoning) or None
        if partial and not content and not reasoning:
            return  # nothing arrived: an empty bubble would only confuse the history
        usage = reply.usage or {}
        with self.db.tx() as tx:
            tx.insert(
                "INSERT INTO messages (uid, role_code, sender_role, content, has_image, is_partial, created_at,"
                " prompt_tokens, completion_tokens, reasoning_content) VALUES (?, ?, 'assistant', ?, 0, ?, ?, ?, ?, ?)",
                (
                    uid,
                    role_code,
                    content,
                    int(partial),
                    now_ms(),
                    _integer(usage.get("prompt_tokens")),
                    _integer(usage.get("completion_tokens")),
                    reasoning,
                ),
            )

    # -- history and clear -------------------------------------------------------------------------
    def history(self, uid: str, args: Any) -> dict[str, Any]:
        """This user's messages with a role, oldest first; a page of them when `limit`/`before_id` is given.

        Without paging parameters the response is exactly the contract's (every message, no extra fields).
        """
        role = self.roles.get(args.get("role_code"))
        limit = _query_int(args, "limit", low=1, high=HISTORY_PAGE_MAX)
        before_id = _query_int(args, "before_id", low=1, high=MAX_ID)
        paged = limit is not None or before_id is not None
        sql = (
            "SELECT id, sender_role, content, has_image, is_partial, created_at FROM messages"
            " WHERE uid = ? AND role_code = ?"
        )
        params: list[Any] = [uid, role.role_code]
        if before_id is not None:
            sql += " AND id < ?"
            params.append(before_id)
        if paged:
            # Newest first to take the page, one extra row to learn whether more remain; shown oldest first.
            page_size = limit or HISTORY_PAGE_DEFAULT
            sql += " ORDER BY id DESC LIMIT ?"
            params.append(page_size + 1)
        else:
            sql += " ORDER BY id"
        rows = self.db.read(lambda tx: tx.all(sql, params))
        body: dict[str, Any] = {"success": True, "role_code": role.role_code}
        if paged:
            has_more = len(rows) > page_size
            rows = list(reversed(rows[:page_size]))
            body["messages"] = [self._history_item(row) for row in rows]
            body["has_more"] = has_more
            body["next_before_id"] = int(rows[0]["id"]) if has_more and rows else None
        else:
            body["messages"] = [self._history_item(row) for row in rows]
        return body

    def _history_item(self, row: Row) -> dict[str, Any]:
        return {
            "id": int(row["id"]),
            "sender_role": row["sender_role"],
            "content": row["content"],
            "has_image": bool(row["has_image"]),
            "is_partial": bool(row["is_partial"]),
            "created_at": format_time(row["created_at"], self.settings),
        }

    def delete_message(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Delete one of this user's messages by id (404 for an unknown id or another user's message)."""
        message_id = _integer(body.get("message_id"))
        if message_id is None:
            raise ApiError("InvalidInput", "参数 message_id 必须是整数")
        if not 1 <= message_id <= MAX_ID:
            raise ApiError("MessageNotFound")  # no row can have it; the database could not even bind it
        with self.db.tx() as tx:
            # The uid in the WHERE clause is the authorisation: another user's id looks exactly like an unknown one.
            deleted = tx.execute("DELETE FROM messages WHERE id = ? AND uid = ?", (message_id, uid))
        if not deleted:
            raise ApiError("MessageNotFound")
        return {"success": True, "message": "消息已删除", "deleted_count": deleted}

    def clear(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Delete this user's messages with one role (other roles and users are untouched)."""
        role = self.roles.get(body.get("role_code"))
        with self.db.tx() as tx:
            deleted = tx.execute("DELETE FROM messages WHERE uid = ? AND role_code = ?", (uid, role.role_code))
        log.info("conversation cleared", extra={"uid": uid, "role_code": role.role_code, "deleted": deleted})
        return {"success": True, "message": "当前聊天已清空", "deleted_count": deleted}


class StreamRelay:
    """The SSE body of one /chat/stream: forwards upstream frames as they arrive and owns the cleanup.

    The WSGI server calls close() however the response ends (finished, client gone, error), even if the
    body was never iterated; cleanup runs exactly once: close the upstream, keep what arrived, free the slot.
    """

    def __init__(
        self,
        chat: Chat,
        *,
        uid: str,
        role_code: str,
        upstream: UpstreamStream,
        slot_id: int,
        started: float,
        client: socket.socket | None = None,
        operation_id: str = "chat_stream",
    ) -> None:
        self.chat = chat
        self.operation_id = operation_id
        self.uid = uid
        self.role_code = role_code
        self.upstream = upstream
        self.slot_id = slot_id
        self.started = started
        self.reply = Reply()
        self.saved = False
        self.outcome = "client_gone"
        self.frames_sent = 0
        self._finished = False
        self.client_gone = False
        self._frames = self._run()
        self._unwatch = watcher.watch(client, self._on_client_gone) if client is not None else _nothing

    def __iter__(self) -> StreamRelay:
        return self

    def __next__(self) -> bytes:
        return next(self._frames)

    def close(self) -> None:
        """End the stream early or after the fact; idempotent."""
        self._frames.close()
        self._finish()

    def _run(self) -> Iterator[bytes]:
        try:
            try:
                finished = False
                for payload in self.upstream.frames():
                    try:
                        frame = json.loads(payload)
                    except ValueError as exc:
                        raise StreamBroken("UpstreamHTTPError", "malformed upstream frame") from exc
                    if isinstance(frame, dict):
                        if frame.get("error") and not frame.get("choices"):
                            raise StreamBroken("UpstreamHTTPError", "upstream reported an error mid-stream")
                        finished = self.reply.add(frame) or finished
                    self.frames_sent += 1
                    yield b"data: " + payload + b"\n\n"
                if not (self.upstream.done or finished):
                    raise StreamBroken("NetworkError", "upstream ended before finishing")
            except StreamBroken as exc:
                if self.client_gone:
                    return  # we cut the upstream ourselves: nobody is left to tell; _finish keeps what arrived
                self.outcome = f"broken:{exc.code}"
                log.warning(
                    "upstream stream broke", extra={"uid": self.uid, "reason": exc.reason, "frames": self.frames_sent}
                )
                self.saved = True
                self.chat.save_reply(self.uid, self.role_code, self.reply, partial=True)
                yield fallback_frame(exc.code)
                yield DONE_FRAME
                return
            # Stored before [DONE]: a client that refreshes history on [DONE] must see the reply.
            self.saved = True
            self.chat.save_reply(self.uid, self.role_code, self.reply, partial=False)
            self.outcome = "complete"
            yield DONE_FRAME
        except ApiError as exc:
            # Storing the reply failed after the stream started: report it in-band.
            self.outcome = f"error:{exc.code}"
            yield fallback_frame(exc.code)
            yield DONE_FRAME
        finally:
            self._finish()

    def _on_client_gone(self) -> None:
        # Runs on the watcher thread: unblock the relay's read; the relay thread does the cleanup.
        self.client_gone = True
        self.upstream.abort()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._unwatch()
        self.upstream.close()
        if not self.saved:
            # The client went away (or something unexpected happened): keep what arrived.
            try:
                self.chat.save_reply(self.uid, self.role_code, self.reply, partial=True)
            except ApiError:
                log.error("could not store a partial reply", extra={"uid": self.uid})
        self.chat.release_slot(self.slot_id)
        log_access(
            method="POST",
            path=None,
            operation_id=self.operation_id,
            uid=self.uid,
            status=200,
            started=self.started,
            outcome=self.outcome,
            frames=self.frames_sent,
        )
