"""ChatService web function: the route table of the contract's ChatService and its thin handlers."""

from functools import partial

from aichat import auth, llm
from aichat.accounts import token_is_live
from aichat.chat import Chat
from aichat.config import load_settings
from aichat.llm import LlmClient
from aichat.roles import RoleCatalog
from aichat.store import open_database
from aichat.web import ApiRequest, Route, create_app, json_response, sse_response

settings = load_settings(service="chat")
db = open_database(settings)
roles = RoleCatalog(db, roles_file=settings.roles_file)
chat = Chat(
    settings,
    db,
    roles,
    LlmClient(
        base_url=settings.llm_base_url,
        api_key=settings.llm_api_key,
        connect_timeout_s=settings.llm_connect_timeout_s,
        read_timeout_s=settings.llm_read_timeout_s,
    ),
)


def chat_roles(req: ApiRequest):
    """The enabled roles' public fields (no auth)."""
    return json_response(roles.public_body())


def chat_stream(req: ApiRequest):
    """Stream the role's reply to the user's message as SSE."""
    return sse_response(chat.stream(req.user_uid(), req.json(), client=req.client_socket))


def chat_history(req: ApiRequest) -> dict:
    """The user's messages with one role, oldest first (optionally a page: limit, before_id)."""
    return chat.history(req.user_uid(), req.args)


def chat_clear(req: ApiRequest) -> dict:
    """Delete the user's messages with one role."""
    return chat.clear(req.user_uid(), req.json())


def chat_delete_message(req: ApiRequest) -> dict:
    """Delete one of the user's messages (extension)."""
    return chat.delete_message(req.user_uid(), req.json())


def chat_regenerate(req: ApiRequest):
    """Stream a new reply to the last user message, replacing the old one (extension)."""
    return sse_response(chat.regenerate(req.user_uid(), req.json(), client=req.client_socket))


def chat_edit(req: ApiRequest):
    """Edit the last user message and stream a new reply (extension)."""
    return sse_response(chat.edit(req.user_uid(), req.json(), client=req.client_socket))


def initialize() -> None:
    """FC's initializer: open a database connection and load what the first streams need."""
    db.warm()
    auth.preload()
    llm.preload()


ROUTES = [
    Route("chat_roles", "GET", "/chat/roles", "none", chat_roles),
    Route("chat_stream", "POST", "/chat/stream", "bearer_jwt", chat_stream, response_type="sse"),
    Route("chat_history", "GET", "/chat/history", "bearer_jwt", chat_history),
    Route("chat_clear", "POST", "/chat/clear", "bearer_jwt", chat_clear),
    # Extensions beyond the contract (README, docs/openapi.yaml).
    Route("chat_delete_message", "POST", "/chat/message/delete", "bearer_jwt", chat_delete_message),
    Route("chat_regenerate", "POST", "/chat/regenerate", "bearer_jwt", chat_regenerate, response_type="sse"),
    Route("chat_edit", "POST", "/chat/edit", "bearer_jwt", chat_edit, response_type="sse"),
]

app = create_app(
    service="chat",
    routes=ROUTES,
    settings=settings,
    body_limit=settings.chat_body_limit,
    token_is_live=partial(token_is_live, db),
    on_initialize=initialize,
    on_pre_stop=db.close_idle,
)
