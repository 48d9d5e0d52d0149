"""A repeat of a finished send, answered from what the first one stored (no new rows, no upstream call)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..sse import DONE_FRAME
from ..store import Database, Tx
from . import idempotency, messages
from .history import format_time
from .idempotency import Replay
from .tooluse import parse_trace, public_trace
from .turn import FALLBACK_MESSAGES, Turn, local_frame

log = logging.getLogger("aichat.chat")

PIECE_CHARS = 64


def frames(replay: Replay, reply: dict[str, Any] | None, *, model: str, role_code: str | None) -> Iterator[bytes]:
    """The stored outcome as a stream: the meta frame, the reply's text, the done (or error) frame, [DONE]."""
    continued = replay.response if replay.operation == "continue" and replay.response else None
    meta = {
        "type": "stream.meta",
        "conversation_id": replay.conversation_id,
        "message_id": None if continued else replay.user_message_id,
        "role_code": role_code,
        "replayed": True,
    }
    if continued:
        meta["continues"] = continued["continues"]
    yield local_frame(model, x_event=meta)
    text = reply["content"] if reply else ""
    if continued:
        text = text[int(continued.get("offset") or 0) :]  # only what the continuation added
    for start in range(0, len(text), PIECE_CHARS):
        piece = text[start : start + PIECE_CHARS]
        yield _text_frame(model, piece)
    message_id = reply["id"] if reply else replay.reply_message_id
    if replay.error_code:
        message = FALLBACK_MESSAGES.get(replay.error_code, FALLBACK_MESSAGES["InternalError"])
        event = {
            "type": "error",
            "code": replay.error_code,
            "message": message,
            "message_id": message_id,
            "conversation_id": replay.conversation_id,
            "replayed": True,
        }
        yield local_frame(
            model, finish_reason="error", error={"code": replay.error_code, "message": message}, x_event=event
        )
        yield DONE_FRAME
        return
    usage = usage_of(reply)
    done = {
        "type": "done",
        "message_id": message_id,
        "conversation_id": replay.conversation_id,
        "finish_reason": "stop",
        "usage": usage,
        "replayed": True,
    }
    yield local_frame(model, finish_reason="stop", **({"usage": usage} if usage else {}), x_event=done)
    yield DONE_FRAME


def _text_frame(model: str, text: str) -> bytes:
    import time
    import uuid

    from ..sse import encode

    return encode(
        {
            "id": f"local-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
    )


def usage_of(reply: dict[str, Any] | None) -> dict[str, int] | None:
    """A stored reply's token counts as the usage object (None when the upstream reported none)."""
    if not reply or reply.get("prompt_tokens") is None:
        return None
    prompt, completion = int(reply["prompt_tokens"]), int(reply.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def settle(db: Database, uid: str, key: str, turn: Turn) -> None:
    """The keyed turn ended: a repeat answers its stored reply (and its in-band error, if it had one)."""
    error = ApiError(turn.error_code) if turn.error_code else None
    try:
        with db.tx() as tx:
            idempotency.finish(tx, uid=uid, key=key, reply_message_id=turn.message_id, error=error)
    except ApiError:
        log.warning("could not record an idempotent send's outcome; a repeat answers what was stored")


def reply_row(db: Database, uid: str, seen: Replay) -> dict[str, Any] | None:
    """The reply the first request stored (by its id, or the one that answered its user message)."""

    def read(tx: Tx) -> dict[str, Any] | None:
        if seen.reply_message_id is not None:
            return messages.get(tx, uid=uid, message_id=seen.reply_message_id)
        if seen.conversation_id is None or seen.user_message_id is None:
            return None
        return messages.first_reply_after(tx, conversation_id=seen.conversation_id, message_id=seen.user_message_id)

    return db.read(read)


def answer_json(db: Database, settings: Settings, uid: str, seen: Replay) -> dict[str, Any]:
    """A repeat of /chat/send: the first answer again (or, if it was never recorded, rebuilt)."""
    if seen.status == "failed" or seen.error_code:
        raise refused(seen)
    if seen.response is not None:
        return seen.response
    row = reply_row(db, uid, seen)
    if row is None:
        raise ApiError("InternalError", "该请求的回复未能保存")
    message = {name: row[name] for name in ("id", "sender_role", "content", "has_image")}
    message.update(is_partial=bool(row["is_partial"]), created_at=format_time(row["created_at"], settings))
    message["has_image"] = bool(message["has_image"])
    if row.get("reasoning_content"):
        message["reasoning_content"] = row["reasoning_content"]
    if row.get("tool_calls"):
        message["tools"] = public_trace(parse_trace(row["tool_calls"]))
    message["usage"] = usage_of(row)
    return {
        "success": True,
        "message": message,
        "user_message_id": seen.user_message_id,
        "conversation_id": seen.conversation_id,
    }


def refused(replay: Replay) -> ApiError:
    """A first request refused before its first frame is refused the same way again."""
    return ApiError(replay.error_code or "InternalError", replay.error_message)
