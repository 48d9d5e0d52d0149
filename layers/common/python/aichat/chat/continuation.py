"""POST /chat/continue: the model continues a reply that was cut short (a dropped connection, an upstream
failure); only the new text streams, and the stored reply grows in place until it completes.

DashScope's partial mode sends the cut reply as the last assistant message with `partial: true`; other
upstreams (AICHAT_LLM_PARTIAL_MODE=0) get it as an assistant message followed by a user message asking
to go on.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import ApiError
from ..store import Tx
from . import conversations, idempotency, input, messages
from .context import build_messages
from .idempotency import Replay
from .tooluse import parse_trace
from .turn import Reply, Turn

if TYPE_CHECKING:
    from .idempotency import Keyed
    from .service import ChatService

CONTINUE_PROMPT = "请从你上一条回复中断的地方继续说下去，不要重复已经说过的内容。"


def start(service: ChatService, uid: str, body: dict[str, Any], keyed: Keyed) -> Turn | Replay:
    """Limits, the checks, the context (one transaction), then the upstream; a Turn that updates the reply."""
    s = service.settings
    if not service.llm.api_key:
        raise ApiError("MissingApiKey")
    reply_id = input.message_id(body.get("message_id"))
    assert reply_id is not None
    overrides = input.turn_overrides(body, s)
    with service.db.tx() as tx:
        if keyed.key:
            seen = keyed.repeat_of(tx, uid=uid, settings=s)
            if seen is not None:
                return seen
        slot_id = service.limiter.acquire(tx, uid=uid)
        row = messages.get(tx, uid=uid, message_id=reply_id)
        if row is None:
            raise ApiError("MessageNotFound")
        if row["sender_role"] != "assistant" or not row["is_partial"]:
            raise ApiError("InvalidInput", "只能继续一条未完成的角色回复")
        conversation = conversations.get(tx, uid=uid, conversation_id=row["conversation_id"], lock=True)
        assert conversation is not None
        if _has_later(tx, conversation.id, reply_id):
            raise ApiError("InvalidInput", "只能继续会话里最后一条回复")
        role = service.roles.get(conversation.role_code)
        history = messages.context(
            tx, conversation_id=conversation.id, before_id=reply_id, limit=s.history_max_messages
        )
        if keyed.key:
            idempotency.claim(
                tx,
                uid=uid,
                key=keyed.key,
                digest=keyed.digest,
                operation="continue",
                conversation_id=conversation.id,
                user_message_id=reply_id,
                ttl_ms=s.idempotency_ttl_s * 1000,
            )
            # A repeat replays only what this continuation added: where the reply was cut is kept.
            idempotency.note(
                tx, uid=uid, key=keyed.key, response={"continues": reply_id, "offset": len(row["content"])}
            )
    service.limiter.keep(slot_id)
    release = partial(service.limiter.release, slot_id)
    prefix = row["content"]
    payload = _payload(service, role, conversation, history, prefix, overrides)
    try:
        upstream = service.llm.open_stream(payload)
    except BaseException as exc:
        release()
        if keyed.key and isinstance(exc, ApiError):
            with service.db.tx() as tx:
                idempotency.finish(tx, uid=uid, key=keyed.key, reply_message_id=None, error=exc, failed=True)
        raise
    earlier_tools = parse_trace(row["tool_calls"])
    # No new user message: `continues` names the reply that grows (the done frame's message_id too).
    meta = {"conversation_id": conversation.id, "message_id": None, "role_code": role.role_code, "continues": reply_id}
    closers = [release]
    turn = Turn(
        upstream=upstream,
        model=payload["model"],
        meta=meta,
        save=partial(_save, service, conversation.id, prefix, earlier_tools),
        spool=partial(_spool, service, conversation.id, prefix, earlier_tools, reply_id),
        on_close=closers,
        policy=service.policy,
    )
    turn.message_id = reply_id  # every save updates the reply in place
    if keyed.key:
        closers.append(partial(service._settle, uid, keyed.key, turn))
    return turn


def _has_later(tx: Tx, conversation_id: str, message_id: int) -> bool:
    return (
        tx.one("SELECT id FROM messages WHERE conversation_id = ? AND id > ? LIMIT 1", (conversation_id, message_id))
        is not None
    )


def _payload(
    service: ChatService,
    role: Any,
    conversation: Any,
    history: list[dict[str, Any]],
    prefix: str,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    s = service.settings
    effective = {**conversation.settings, **overrides}
    params = {name: effective[name] for name in input.PARAMS if effective.get(name) is not None}
    if s.llm_partial_mode:
        turn = {"role": "assistant", "content": prefix, "partial": True}
        shown = history
    else:
        turn = {"role": "user", "content": CONTINUE_PROMPT}
        shown = [*history, {"sender_role": "assistant", "content": prefix, "has_image": 0}]
    payload: dict[str, Any] = {
        "model": effective.get("model") or s.llm_model,
        "messages": build_messages(
            system_prompt=role.system_prompt,
            opening_message=role.opening_message,
            history=shown,
            turn=turn,
            context_tokens=s.context_tokens,
            reserve_tokens=params.get("max_tokens") or s.reply_reserve_tokens,
        ),
        **params,
    }
    if s.llm_thinking_flag:
        payload["enable_thinking"] = False  # DashScope's partial mode does not take thinking
    if s.llm_include_usage:
        payload["stream_options"] = {"include_usage": True}
    return payload


def _record(
    conversation_id: str,
    prefix: str,
    earlier: list[dict[str, Any]],
    reply: Reply,
    partial_: bool,
    message_id: int | None,
) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "reply_to": None,
        "message_id": message_id,
        "content": prefix + reply.text,
        "reasoning": reply.reasoning_text,
        "partial": partial_,
        "usage": reply.usage,
        "tools": [*earlier, *reply.tools] or None,
    }


def _save(
    service: ChatService,
    conversation_id: str,
    prefix: str,
    earlier: list[dict[str, Any]],
    reply: Reply,
    partial_: bool,
    message_id: int | None,
) -> int | None:
    return service._write_reply(_record(conversation_id, prefix, earlier, reply, partial_, message_id))


def _spool(
    service: ChatService,
    conversation_id: str,
    prefix: str,
    earlier: list[dict[str, Any]],
    reply_id: int,
    reply: Reply,
    partial_: bool,
    message_id: int | None,
) -> None:
    service.spool.put(_record(conversation_id, prefix, earlier, reply, partial_, message_id or reply_id))
