"""Tools the characters' skills use: the registry and one small client module per provider."""

from __future__ import annotations

from ..store import Tx


def delete_for_user(tx: Tx, *, uid: str) -> int:
    """Account deletion: the user's tool executions (the direct-execution rate limit's rows). Returns 0: the
    erasers' sum counts messages, and tools store none."""
    from . import runs

    runs.delete_for_user(tx, uid=uid)
    return 0
