"""Which conversation a request means: one by id (the user's own), or a role's default one."""

from __future__ import annotations

from ..errors import ApiError
from ..store import Tx
from . import conversations
from .conversations import Conversation
from .input import Target
from .roles import Role, RoleCatalog


def check_role(roles: RoleCatalog, target: Target) -> Role | None:
    """Refuse an unknown role first, as the contract orders its checks (before the message is looked at)."""
    return roles.get(target.role_code) if target.role_code is not None else None


def resolve(tx: Tx, *, uid: str, target: Target, create: bool) -> Conversation | None:
    """The conversation a target names; a role's default one is created on first use when `create`.

    An unknown id and another user's look the same (404); a role_code that disagrees with the
    conversation's is a client mistake (400). Without `create`, a default conversation never used is None.
    """
    if target.conversation_id is None:
        assert target.role_code is not None  # input.target() guarantees one of the two
        return conversations.default_for(tx, uid=uid, role_code=target.role_code, create=create)
    conversation = conversations.get(tx, uid=uid, conversation_id=target.conversation_id, lock=create)
    if conversation is None:
        raise ApiError("ConversationNotFound")
    if target.role_code is not None and target.role_code != conversation.role_code:
        raise ApiError("InvalidInput", "role_code 与会话的角色不一致")
    return conversation
