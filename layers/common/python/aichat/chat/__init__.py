"""ChatService's feature: roles, conversations, messages, limits, the turn engine and the relay."""

from __future__ import annotations

from ..store import Tx


def delete_for_user(tx: Tx, *, uid: str) -> int:
    """Account deletion: everything chat stored for the user (its messages, conversations, limits); returns
    how many messages went."""
    from . import conversations, idempotency, limits, messages

    idempotency.delete_for_user(tx, uid=uid)
    erased = messages.delete_for_user(tx, uid=uid)
    conversations.delete_for_user(tx, uid=uid)
    limits.delete_for_user(tx, uid=uid)
    return erased
