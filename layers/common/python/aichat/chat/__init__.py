"""ChatService's feature: roles, conversations, messages, limits, the turn engine and the relay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def eraser(redis: Any = None) -> Callable[..., int]:
    """Account deletion's chat part: delete_for_user, and with Redis the user's counters and slots there
    (best effort, in the deletion's transaction: they expire by themselves anyway)."""
    if redis is None:
        return delete_for_user

    def erase(tx: Tx, *, uid: str) -> int:
        from .redis_limits import delete_for_user as forget_in_redis

        forget_in_redis(redis, uid)
        return delete_for_user(tx, uid=uid)

    return erase
