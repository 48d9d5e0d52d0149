"""ChatService web function: the route table of the contract's ChatService and its thin handlers."""

from __future__ import annotations

from functools import partial
from typing import Any

from aichat import fastpath, llm, tokens
from aichat.chat.conversation_api import ConversationApi
from aichat.chat.history import History
from aichat.chat.roles import RoleCatalog
from aichat.chat.service import ChatService
from aichat.chat.skills_api import SkillsApi
from aichat.config import Settings, load_settings
from aichat.llm import LlmClient
from aichat.store import open_database
from aichat.tools.registry import ToolRegistry, build_registry
from aichat.voice.service import Voice
from aichat.web import ApiRequest, Route, create_app, json_response, sse_response
from flask import Flask


def build_app(
    settings: Settings | None = None,
    *,
    llm_client: LlmClient | None = None,
    db: Any = None,
    tools: ToolRegistry | None = None,
    voice: Voice | None = None,
) -> Flask:
    """ChatService's app: from the environment on FC, from the given settings and clients in tests."""
    settings = settings or load_settings(service="chat")
    db = db or open_database(settings)
    roles = RoleCatalog(db, roles_file=settings.roles_file)
    tools = tools or build_registry(settings, db, roles.nickname)
    client = llm_client or LlmClient(
        base_url=settings.llm_base_url,
        api_key=settings.llm_api_key,
        connect_timeout_s=settings.llm_connect_timeout_s,
        read_timeout_s=settings.llm_read_timeout_s,
    )
    voice = voice or Voice(settings, db, roles)
    redis = fastpath.build(settings)
    limiter = None
    if redis is not None:
        from aichat.chat.redis_limits import RedisChatLimiter

        limiter = RedisChatLimiter(settings, db, redis)
    chat = ChatService(settings, db, roles, client, limiter=limiter, tools=tools, on_removed=voice.forget_removed)
    history = History(settings, db, roles, on_removed=voice.forget_removed)
    threads = ConversationApi(settings, db, roles, on_removed=voice.forget_removed)
    skills = SkillsApi(settings, db, roles, tools)

    def chat_roles(req: ApiRequest):
        """The enabled roles' public fields (no auth)."""
        return json_response(roles.public_body())

    def chat_stream(req: ApiRequest):
        """Stream the role's reply to the user's message as SSE."""
        return sse_response(chat.stream(req.user_uid(), req.json(), client=req.client_socket, key=idem_key()))

    def chat_send(req: ApiRequest) -> dict:
        """The role's whole reply to the user's message as JSON (extension)."""
        return chat.send(req.user_uid(), req.json(), key=idem_key())

    def chat_history(req: ApiRequest) -> dict:
        """The user's messages in a conversation, oldest first (optionally a page: limit, before_id)."""
        return history.history(req.user_uid(), req.args)

    def chat_clear(req: ApiRequest) -> dict:
        """Delete the user's messages in a conversation (the role's default one without conversation_id)."""
        return history.clear(req.user_uid(), req.json())

    def chat_delete_message(req: ApiRequest) -> dict:
        """Delete one of the user's messages (extension)."""
        return history.delete_message(req.user_uid(), req.json())

    def chat_regenerate(req: ApiRequest):
        """Stream a new reply to the last user message, replacing the old one (extension)."""
        return sse_response(chat.regenerate(req.user_uid(), req.json(), client=req.client_socket, key=idem_key()))

    def chat_continue(req: ApiRequest):
        """Continue a reply that was cut short, streaming only the new text (extension)."""
        return sse_response(chat.continue_reply(req.user_uid(), req.json(), client=req.client_socket, key=idem_key()))

    def chat_edit(req: ApiRequest):
        """Edit the last user message and stream a new reply (extension)."""
        return sse_response(chat.edit(req.user_uid(), req.json(), client=req.client_socket, key=idem_key()))

    def chat_conversation_create(req: ApiRequest) -> dict:
        """Start a new conversation with a role (extension)."""
        return threads.create(req.user_uid(), req.json())

    def chat_conversations(req: ApiRequest) -> dict:
        """The user's conversations, most recently active first (extension)."""
        return threads.list(req.user_uid(), req.args)

    def chat_conversation(req: ApiRequest) -> dict:
        """One conversation (extension)."""
        return threads.show(req.user_uid(), req.args)

    def chat_conversation_update(req: ApiRequest) -> dict:
        """Rename a conversation or change its settings (extension)."""
        return threads.update(req.user_uid(), req.json())

    def chat_conversation_delete(req: ApiRequest) -> dict:
        """Delete a conversation and its messages (extension)."""
        return threads.delete(req.user_uid(), req.json())

    def chat_role_skills(req: ApiRequest) -> dict:
        """A role's skills, with the role's own names for them (no auth, like the roles; extension)."""
        return skills.role_skills(req.args)

    def chat_skill(req: ApiRequest):
        """Use one of the role's skills now; the role answers about the result, streamed (?stream=0: JSON)."""
        if req.args.get("stream") == "0":
            return chat.skill_send(req.user_uid(), req.json(), key=idem_key())
        return sse_response(chat.skill(req.user_uid(), req.json(), client=req.client_socket, key=idem_key()))

    def chat_tools(req: ApiRequest) -> dict:
        """Every tool this deployment runs (extension)."""
        return skills.list()

    def chat_tool(req: ApiRequest) -> dict:
        """One tool by name (extension)."""
        return skills.show(req.args)

    def chat_tool_execute(req: ApiRequest) -> dict:
        """Run a tool by hand (rate limited; extension)."""
        return skills.execute(req.user_uid(), req.json())

    def chat_voice(req: ApiRequest):
        """A stored reply read aloud in its role's voice: MP3 bytes, or a redirect to a signed URL (extension)."""
        from aichat.chat import input as chat_input
        from aichat.errors import ApiError
        from aichat.voice.http import clip_response

        uid = req.user_uid()
        message_id = chat_input.query_int(req.args, "message_id", low=1, high=chat_input.MAX_ID)
        if message_id is None:
            raise ApiError("InvalidInput", "缺少必填参数 message_id")
        return clip_response(*voice.clip(uid, message_id, req.fc_credentials()))

    def initialize() -> None:
        """FC's initializer: open a database connection and load what the first streams need."""
        db.warm()
        tokens.preload()
        llm.preload()
        if redis is not None:
            redis.warm()

    routes = [
        Route("chat_roles", "GET", "/chat/roles", "none", chat_roles),
        Route("chat_stream", "POST", "/chat/stream", "bearer_jwt", chat_stream, response_type="sse"),
        Route("chat_history", "GET", "/chat/history", "bearer_jwt", chat_history),
        Route("chat_clear", "POST", "/chat/clear", "bearer_jwt", chat_clear),
        # Extensions beyond the contract (README, docs/openapi.yaml).
        Route("chat_send", "POST", "/chat/send", "bearer_jwt", chat_send),
        Route("chat_delete_message", "POST", "/chat/message/delete", "bearer_jwt", chat_delete_message),
        Route("chat_regenerate", "POST", "/chat/regenerate", "bearer_jwt", chat_regenerate, response_type="sse"),
        Route("chat_edit", "POST", "/chat/edit", "bearer_jwt", chat_edit, response_type="sse"),
        Route("chat_continue", "POST", "/chat/continue", "bearer_jwt", chat_continue, response_type="sse"),
        Route("chat_conversation_create", "POST", "/chat/conversations", "bearer_jwt", chat_conversation_create),
        Route("chat_conversations", "GET", "/chat/conversations", "bearer_jwt", chat_conversations),
        Route("chat_conversation", "GET", "/chat/conversation", "bearer_jwt", chat_conversation),
        Route("chat_conversation_update", "POST", "/chat/conversation/update", "bearer_jwt", chat_conversation_update),
        Route("chat_conversation_delete", "POST", "/chat/conversation/delete", "bearer_jwt", chat_conversation_delete),
        Route("chat_role_skills", "GET", "/chat/role/skills", "none", chat_role_skills),
        Route("chat_skill", "POST", "/chat/skill", "bearer_jwt", chat_skill, response_type="sse"),
        Route("chat_tools", "GET", "/chat/tools", "none", chat_tools),
        Route("chat_tool", "GET", "/chat/tool", "none", chat_tool),
        Route("chat_tool_execute", "POST", "/chat/tool/execute", "bearer_jwt", chat_tool_execute),
        Route("chat_voice", "GET", "/chat/voice", "bearer_jwt", chat_voice),
    ]
    return create_app(
        service="chat",
        routes=routes,
        settings=settings,
        body_limit=settings.chat_body_limit,
        token_is_live=partial(tokens.token_is_live, db, redis=redis),
        on_initialize=initialize,
        on_pre_stop=db.close_idle,
    )


def idem_key() -> str | None:
    """The request's Idempotency-Key header (validated with the body's client_message_id by the service)."""
    from flask import request

    return request.headers.get("Idempotency-Key")


app = build_app()
ROUTES = app.config["AICHAT_ROUTES"]
