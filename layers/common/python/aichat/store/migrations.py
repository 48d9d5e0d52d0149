"""The schema as an append-only list of migrations, and the runner that applies what a database lacks.

Every step is idempotent, so a migrator that dies half-way (MySQL commits each DDL statement on its own)
leaves a schema the next run completes: tables and indexes are created "if not exists", columns and
indexes added by ALTER are looked up first, and data steps only touch rows not yet migrated.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Protocol

from ..errors import ApiError
from . import schema
from .tx import Tx, now_ms


class Sessions(Protocol):
    """What the runner needs of a database: a connection that manages its own transactions."""

    def session(self) -> AbstractContextManager[Tx]:
        """A pooled connection in autocommit mode."""


log = logging.getLogger("aichat.store")

# MySQL: how long one GET_LOCK call waits (below the connection's read timeout), and how long in all a
# migrator waits for another instance's migration before giving up.
LOCK_WAIT_STEP_S = 3
LOCK_WAIT_TOTAL_S = 120
LOCK_NAME = "aichat_migrate"


def migrate(db: Sessions) -> list[int]:
    """Apply the migrations this database lacks, in order; safe to run any number of times, from many instances."""
    applied: list[int] = []
    with db.session() as tx:
        _lock(tx)
        try:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name "
                + ("TEXT" if tx.dialect == "sqlite" else "VARCHAR(200)")
                + " NOT NULL, applied_at BIGINT NOT NULL)"
            )
            done = {row["version"] for row in tx.all("SELECT version FROM schema_migrations")}
            for version, name, sqlite_steps, mysql_steps in schema.MIGRATIONS:
                if version in done:
                    continue
                # SQLite's DDL is transactional: a migration applies whole or not at all. MySQL commits each
                # DDL statement by itself, which is why every step is idempotent.
                tx.begin()
                try:
                    for step in sqlite_steps if tx.dialect == "sqlite" else mysql_steps:
                        step.apply(tx) if not isinstance(step, str) else tx.execute(step)
                    tx.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, now_ms()),
                    )
                except BaseException:
                    tx.rollback()
                    raise
                tx.commit()
                applied.append(version)
            # Messages an older release wrote after this schema was in place (a rollback, then a redeploy)
            # have no conversation yet: give them their role's default one, every start (cheap when none).
            if 5 in done or 5 in applied:
                tx.begin()
                try:
                    schema.adopt_orphan_messages(tx)
                except BaseException:
                    tx.rollback()
                    raise
                tx.commit()
        finally:
            _unlock(tx)
    if applied:
        log.info("migrations applied", extra={"versions": applied})
    return applied


def _lock(tx: Tx) -> None:
    """Serialise concurrent migrators on MySQL (several instances starting at once); SQLite's BEGIN does it."""
    if tx.dialect != "mysql":
        return
    deadline = time.monotonic() + LOCK_WAIT_TOTAL_S
    # Each wait stays below the connection's read timeout; the answer is checked: a migrator that did not get
    # the lock never runs.
    while True:
        row = tx.one("SELECT GET_LOCK(?, ?) AS got", (LOCK_NAME, LOCK_WAIT_STEP_S))
        if row and row["got"] == 1:
            return
        if time.monotonic() >= deadline:
            log.error("another migrator holds the migration lock; giving up")
            raise ApiError("DatabaseError")


def _unlock(tx: Tx) -> None:
    if tx.dialect == "mysql":
        tx.one("SELECT RELEASE_LOCK(?) AS released", (LOCK_NAME,))


def ddl(dialect: str) -> str:
    """The whole schema as one SQL script, for operators who create tables by hand."""
    lines = [f"-- aichat schema ({dialect}); generated from aichat.store.schema by `make schema`."]
    for version, name, sqlite_steps, mysql_steps in schema.MIGRATIONS:
        lines.append(f"\n-- migration {version}: {name}")
        for step in sqlite_steps if dialect == "sqlite" else mysql_steps:
            text = step if isinstance(step, str) else step.sql()
            lines.append(" ".join(text.split()) + ("" if text.startswith("--") else ";"))
    return "\n".join(lines) + "\n"
