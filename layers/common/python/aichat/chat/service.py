"""ChatService's replies: a turn's input, limits and storage around the turn engine, streamed or not."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..llm import LlmClient
from ..store import Database, Tx
from ..tools.base import ToolContext
from ..tools.registry import ToolRegistry
from . import conversations, idempotency, input, messages, replay, skill_turn, upstream_request
from .context import IMAGE_ONLY_PLACEHOLDER, stored_text
from .conversations import Conversation
from .history import format_time
from .idempotency import Keyed, Replay
from .limits import ChatLimiter, DbChatLimiter
from .relay import StreamRelay
from .roles import RoleCatalog
from .spool import Spool
from .targets import check_role, resolve
from .tooluse import ToolRounds, public_trace
from .turn import Reply, Turn, TurnPolicy

log = logging.getLogger("aichat.chat")

# write(tx, conversation) -> the turn as the model will see it, and the id of the user message it answers.
Write = Callable[[Tx, Conversation], tuple[input.TurnInput, int]]


class ChatService:
    """Replies of a role in a conversation: streamed (SSE) or whole (JSON), regenerated or after an edit."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        roles: RoleCatalog,
        llm: LlmClient,
        limiter: ChatLimiter | None = None,
        tools: ToolRegistry | None = None,
        on_removed: Callable[[str], Any] | None = None,
    ) -> None:
        self.settings = settings
        # Called (best effort) after a regenerate or edit removed replies: their cached audio goes too.
        self.on_removed = on_removed or (lambda uid: None)
        self.db = db
        self.roles = roles
        self.llm = llm
        self.tools = tools or ToolRegistry(settings, [])
        self.limiter = limiter or DbChatLimiter(settings, db)
        self.spool = Spool(settings.spool_dir, self._write_reply)
        self.policy = TurnPolicy(
            max_chars=settings.reply_max_chars,
            max_seconds=settings.reply_max_seconds,
            heartbeat_s=settings.sse_heartbeat_s,
            checkpoint_s=settings.reply_checkpoint_s,
            save_window_s=settings.reply_save_window_s,
        )

    # -- operations ----------------------------------------------------------------------------------
    def stream(
        self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None, key: str | None = None
    ) -> StreamRelay:
        """POST /chat/stream: a new user message and the role's reply as SSE.

        Errors before the first frame are raised as ApiError (JSON answers); after it, the turn reports
        them in-band (the fallback frame). With an idempotency key (`key`: the header), a repeat answers
        what the first request stored.
        """
        return self._relay(self._new_message(uid, body, Keyed("stream", body, key)), client, uid)

    def send(self, uid: str, body: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """POST /chat/send: the same turn as /chat/stream, answered as one JSON body when it is complete."""
        keyed = Keyed("send", body, key)
        return self.complete(uid, self._new_message(uid, body, keyed), keyed)

    def skill(
        self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None, key: str | None = None
    ) -> StreamRelay:
        """POST /chat/skill: run one of the role's skills now; the role then answers about its result."""
        return self._relay(skill_turn.start(self, uid, body, Keyed("skill", body, key)), client, uid)

    def skill_send(self, uid: str, body: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """POST /chat/skill?stream=0: the same, answered as /chat/send answers."""
        keyed = Keyed("skill_send", body, key)
        return self.complete(uid, skill_turn.start(self, uid, body, keyed), keyed)

    def complete(self, uid: str, turn: Turn | Replay, keyed: Keyed | None = None) -> dict[str, Any]:
        """Run a turn to its end and answer it as JSON (the /chat/send shape)."""
        if isinstance(turn, Replay):
            return replay.answer_json(self.db, self.settings, uid, turn)
        try:
            for _ in turn.frames():
                pass
        finally:
            turn.close()
        if turn.error_code is not None:
            raise ApiError(turn.error_code)
        answer = {
            "success": True,
            "message": self._stored_reply(uid, turn),
            "user_message_id": turn.meta["message_id"],
            "conversation_id": turn.meta["conversation_id"],
        }
        if keyed is not None and keyed.key:
            with self.db.tx() as tx:
                idempotency.finish(tx, uid=uid, key=keyed.key, reply_message_id=turn.message_id, response=answer)
        return answer

    def continue_reply(
        self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None, key: str | None = None
    ) -> StreamRelay:
        """POST /chat/continue: the model goes on with a reply that was cut short (only the new text streams;
        the stored reply grows in place and loses its partial flag when it completes)."""
        from . import continuation

        return self._relay(continuation.start(self, uid, body, Keyed("continue", body, key)), client, uid)

    def regenerate(
        self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None, key: str | None = None
    ) -> StreamRelay:
        """POST /chat/regenerate: answer the last user message again, replacing the replies after it."""
        keyed = Keyed("regenerate", body, key)
        target = input.target(body)
        check_role(self.roles, target)
        overrides = input.turn_overrides(body, self.settings)

        def write(tx: Tx, conversation: Conversation) -> tuple[input.TurnInput, int]:
            last = self._rewind(tx, conversation, message_id=None)
            # The image itself is never stored, so a regenerated turn carries its text (or a placeholder).
            return input.TurnInput(text=stored_text(last), image=None, overrides=overrides), last["id"]

        turn = self._start(uid, target, write, keyed=keyed)
        self.on_removed(uid)
        return self._relay(turn, client, uid)

    def edit(
        self, uid: str, body: dict[str, Any], *, client: socket.socket | None = None, key: str | None = None
    ) -> StreamRelay:
        """POST /chat/edit: replace the last user message's text (and image), then answer it anew."""
        keyed = Keyed("edit", body, key)
        target = input.target(body)
        check_role(self.roles, target)
        pending = input.turn(body, self.settings)
        raw_id = body.get("message_id")
        message_id = input.integer(raw_id)
        if raw_id is not None and (message_id is None or not 1 <= message_id <= input.MAX_ID):
            raise ApiError("InvalidInput", "参数 message_id 必须是最后一条用户消息的 id")

        def write(tx: Tx, conversation: Conversation) -> tuple[input.TurnInput, int]:
            new = with_image(pending, self.settings)
            last = self._rewind(tx, conversation, message_id=message_id)
            messages.rewrite_user_message(tx, message_id=last["id"], text=new.text, has_image=new.image is not None)
            return new, last["id"]

        turn = self._start(uid, target, write, keyed=keyed)
        self.on_removed(uid)
        return self._relay(turn, client, uid)

    # -- the common path -----------------------------------------------------------------------------
    def _new_message(self, uid: str, body: dict[str, Any], keyed: Keyed) -> Turn | Replay:
        target = input.target(body)
        check_role(self.roles, target)
        pending = input.turn(body, self.settings)

        def write(tx: Tx, conversation: Conversation) -> tuple[input.TurnInput, int]:
            turn = with_image(pending, self.settings)
            message_id = messages.add_user_message(
                tx,
                uid=uid,
                role_code=conversation.role_code,
                conversation_id=conversation.id,
                text=turn.text,
                has_image=turn.image is not None,
            )
            # Only a conversation without a title is named after this message (one UPDATE fewer otherwise).
            first = (turn.text or (IMAGE_ONLY_PLACEHOLDER if turn.image else "")) if not conversation.title else None
            conversations.touch(tx, conversation_id=conversation.id, first_text=first)
            return turn, message_id

        return self._start(uid, target, write, keyed=keyed)

    def _start(
        self,
        uid: str,
        target: input.Target,
        write: Write,
        *,
        first_calls: list[dict[str, Any]] | None = None,
        keyed: Keyed | None = None,
    ) -> Turn | Replay:
        """Limits, the conversation's write and its context (one transaction), then the upstream. A repeat of
        an idempotency key answers a Replay of what the first request stored instead."""
        if not self.llm.api_key:
            raise ApiError("MissingApiKey")
        key = keyed.key if keyed else None
        s = self.settings
        with self.db.tx() as tx:
            # The limiter locks the user's row first: one user's turns are serialised from here, so two
            # first messages to a role cannot race to create its default conversation (an InnoDB deadlock).
            if key:
                assert keyed is not None
                seen = keyed.repeat_of(tx, uid=uid, settings=s)
                if seen is not None:
                    return seen  # before the limiter: a repeat is not another message
            slot_id = self.limiter.acquire(tx, uid=uid)
            conversation = resolve(tx, uid=uid, target=target, create=True)
            assert conversation is not None
            role = self.roles.get(conversation.role_code)
            turn, message_id = write(tx, conversation)
            if key:
                assert keyed is not None
                idempotency.claim(
                    tx,
                    uid=uid,
                    key=key,
                    digest=keyed.digest,
                    operation=keyed.operation,
                    conversation_id=conversation.id,
                    user_message_id=message_id,
                    ttl_ms=s.idempotency_ttl_s * 1000,
                )
            history = messages.context(
                tx, conversation_id=conversation.id, before_id=message_id, limit=self.settings.history_max_messages
            )
        self.limiter.keep(slot_id)
        release = partial(self.limiter.release, slot_id)
        allowed = upstream_request.allowed_tools(self.tools, role, turn)
        payload = upstream_request.build(self.settings, self.tools, role, conversation, turn, history, allowed)
        rounds = None
        if allowed:
            rounds = ToolRounds(
                registry=self.tools,
                allowed=allowed,
                ctx=ToolContext(uid=uid, conversation_id=conversation.id),
                payload=payload,
                llm=self.llm,
                max_rounds=self.settings.tool_max_rounds,
            )
        upstream = None
        try:
            if not first_calls:
                upstream = self.llm.open_stream(payload)
        except BaseException as exc:
            release()
            if key and isinstance(exc, ApiError):
                with self.db.tx() as tx:  # a repeat gets the same refusal, not a second message
                    idempotency.finish(tx, uid=uid, key=key, reply_message_id=None, error=exc, failed=True)
            raise
        log.info(
            "stream opened",
            extra={"uid": uid, "conversation_id": conversation.id, "message_id": message_id, "model": payload["model"]},
        )
        meta = {"conversation_id": conversation.id, "message_id": message_id, "role_code": conversation.role_code}
        closers: list[Callable[[], None]] = [release]
        started = Turn(
            upstream=upstream,
            model=payload["model"],
            meta=meta,
            save=partial(self._save, conversation.id, message_id),
            spool=partial(self._spool, conversation.id, message_id),
            on_close=closers,
            policy=self.policy,
            tools=rounds,
            first_calls=first_calls,
        )
        if key:
            closers.append(partial(self._settle, uid, key, started))
        return started

    def _settle(self, uid: str, key: str, turn: Turn) -> None:
        replay.settle(self.db, uid, key, turn)

    def _relay(self, turn: Turn | Replay, client: socket.socket | None, uid: str = "") -> StreamRelay:
        if isinstance(turn, Replay):
            if turn.status == "failed":
                raise replay.refused(turn)
            row = replay.reply_row(self.db, uid, turn)
            role_code = row.get("role_code") if row else None
            frames = replay.frames(turn, row, model=self.settings.llm_model, role_code=role_code)
            return StreamRelay(
                frames,
                client=client,
                on_client_gone=lambda: None,
                on_client_eof=lambda: None,
                on_close=lambda: None,
                outcome=lambda: "replayed",
            )
        return StreamRelay(
            turn.frames(),
            client=client,
            on_client_gone=turn.abort,
            on_client_eof=turn.probe,
            on_close=turn.close,
            outcome=lambda: turn.outcome,
        )

    def _rewind(self, tx: Tx, conversation: Conversation, *, message_id: int | None) -> dict[str, Any]:
        """Drop the replies after the conversation's last user message (which must be `message_id` if given)."""
        last = messages.last_user_message(tx, conversation_id=conversation.id)
        if last is None:
            raise ApiError("InvalidInput", "当前会话还没有可以重新生成的消息")
        if message_id is not None and message_id != last["id"]:
            raise ApiError("InvalidInput", "只能编辑最后一条用户消息")
        messages.delete_after(tx, conversation_id=conversation.id, message_id=last["id"])
        return last

    def _save(
        self, conversation_id: str, reply_to: int, reply: Reply, partial: bool, message_id: int | None
    ) -> int | None:
        """Store a reply (insert it, or update the row a checkpoint inserted), unless what it answers was
        removed meanwhile (clear, delete, account deletion): then None, and nothing is written."""
        return self._write_reply(
            {
                "conversation_id": conversation_id,
                "reply_to": reply_to,
                "message_id": message_id,
                "content": reply.text,
                "reasoning": reply.reasoning_text,
                "partial": partial,
                "usage": reply.usage,
                "tools": reply.tools,
            }
        )

    def _write_reply(self, record: dict[str, Any]) -> int | None:
        """Store one reply record (from a turn, or from the spool)."""
        fields = {name: record[name] for name in ("conversation_id", "content", "reasoning", "partial", "usage")}
        fields["tools"] = record.get("tools")
        with self.db.tx() as tx:
            if record["message_id"] is None:
                stored = messages.add_reply(tx, reply_to=record["reply_to"], **fields)
            else:
                updated = messages.update_reply(tx, message_id=record["message_id"], **fields)
                stored = record["message_id"] if updated else None
            if stored is not None:
                conversations.touch(tx, conversation_id=record["conversation_id"])
        if stored is None:
            log.info("reply not stored: the message it answers is gone", extra={"reply_to": record["reply_to"]})
        return stored

    def _spool(self, conversation_id: str, reply_to: int, reply: Reply, partial: bool, message_id: int | None) -> None:
        record = {"conversation_id": conversation_id, "reply_to": reply_to, "message_id": message_id}
        record.update(content=reply.text, reasoning=reply.reasoning_text, partial=partial, usage=reply.usage)
        record["tools"] = reply.tools
        self.spool.put(record)

    def _stored_reply(self, uid: str, turn: Turn) -> dict[str, Any]:
        """/chat/send's message object for the reply the turn stored."""
        reply = turn.reply
        created_at = None
        if turn.message_id is not None:
            row = self.db.read(lambda tx: messages.get(tx, uid=uid, message_id=turn.message_id))
            created_at = row["created_at"] if row else None
        body: dict[str, Any] = {
            "id": turn.message_id,
            "sender_role": "assistant",
            "content": reply.text,
            "has_image": False,
            "is_partial": False,
            "created_at": format_time(created_at, self.settings) if created_at is not None else None,
        }
        if reply.reasoning_text:
            body["reasoning_content"] = reply.reasoning_text
        if reply.tools:
            body["tools"] = public_trace(reply.tools)
        body["usage"] = reply.usage
        return body


def with_image(turn: input.TurnInput, settings: Settings) -> input.TurnInput:
    """The turn with its image checked (inside the turn's transaction, after the limits: a refused image
    rolls back the counted message and the slot)."""
    if turn.raw_image is None:
        return turn
    return input.TurnInput(text=turn.text, image=input.decode_image(turn.raw_image, settings), overrides=turn.overrides)
