"""A repeat of a finished send, answered from what the first one stored (no new rows, no upstream call)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import ApiError
from ..sse import DONE_FRAME
from .idempotency import Replay
from .turn import FALLBACK_MESSAGES, local_frame

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


def refused(replay: Replay) -> ApiError:
    """A first request refused before its first frame is refused the same way again."""
    return ApiError(replay.error_code or "InternalError", replay.error_message)
