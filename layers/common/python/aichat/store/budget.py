"""One database budget per request: every wait of the request comes out of it (not one timeout per statement)."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ApiError

log = logging.getLogger("aichat.store")

# The moment the current request must stop waiting on the database (set per request by the web glue).
_budget_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("aichat_db_deadline", default=None)


@contextmanager
def request_budget(seconds: float) -> Iterator[None]:
    """Bound the database wait of everything inside, in all (not per statement)."""
    token = _budget_deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _budget_deadline.reset(token)


def start_budget(seconds: float) -> contextvars.Token:
    """request_budget() for code that cannot wrap the work in a block (a request's before/teardown hooks)."""
    return _budget_deadline.set(time.monotonic() + seconds)


def end_budget(token: contextvars.Token) -> None:
    """Undo start_budget()."""
    _budget_deadline.reset(token)


def wait_allowed(default: float) -> float:
    """The most the next database wait may take: its own timeout, or less if the request's budget is lower."""
    deadline = _budget_deadline.get()
    if deadline is None:
        return default
    remaining = deadline - time.monotonic()
    if remaining <= 0.05:
        log.error("the request's database budget is spent")
        raise ApiError("DatabaseError")
    return min(default, remaining)
