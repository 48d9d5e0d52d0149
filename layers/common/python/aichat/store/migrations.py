"""The schema as an append-only list of migrations, and the runner that applies what a database lacks.

Every step is idempotent, so a migrator that dies half-way (MySQL commits each DDL statement on its own)
leaves a schema the next run completes: tables and indexes are created "if not exists", columns and
indexes added by ALTER are looked up first, and data steps only touch rows not yet migrated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from ..errors import ApiError
from .database import Tx, now_ms

if TYPE_CHECKING:
    from .database import Database

log = logging.getLogger("aichat.store")

# MySQL: how long one GET_LOCK call waits (below the connection's read timeout), and how long in all a
# migrator waits for another instance's migration before giving up.
LOCK_WAIT_STEP_S = 3
LOCK_WAIT_TOTAL_S = 120
LOCK_NAME = "aichat_migrate"


@dataclass(frozen=True)
class AddColumn:
    """ALTER TABLE … ADD COLUMN, skipped when the column exists already."""

    table: str
    column: str
    definition: str

    def sql(self) -> str:
        """The statement, for `make schema`."""
        return f"ALTER TABLE {self.table} ADD COLUMN {self.column} {self.definition}"

    def apply(self, tx: Tx) -> None:
        """Add the column unless a previous run already did."""
        if self.column not in _columns(tx, self.table):
            tx.execute(self.sql())


@dataclass(frozen=True)
class AddIndex:
    """CREATE INDEX on an existing table, skipped when the index exists already."""

    table: str
    name: str
    columns: str

    def sql(self) -> str:
        """The statement, for `make schema`."""
        return f"CREATE INDEX {self.name} ON {self.table} ({self.columns})"

    def apply(self, tx: Tx) -> None:
        """Create the index unless a previous run already did."""
        if tx.dialect == "sqlite":
            exists = tx.one("SELECT name FROM sqlite_master WHERE type = 'index' AND name = ?", (self.name,))
        else:
            exists = tx.one(
                "SELECT index_name FROM information_schema.statistics WHERE table_schema = DATABASE()"
                " AND table_name = ? AND index_name = ? LIMIT 1",
                (self.table, self.name),
            )
        if not exists:
            tx.execute(self.sql())


@dataclass(frozen=True)
class DataStep:
    """Python that rewrites rows; it must itself only touch rows a previous run did not finish."""

    run: Callable[[Tx], None]

    def sql(self) -> str:
        """A comment line in the generated DDL: operators run `python -m aichat.manage migrate` for data."""
        return f"-- data step: {self.run.__doc__ or self.run.__name__}"

    def apply(self, tx: Tx) -> None:
        """Run the step."""
        self.run(tx)


Step = Union[str, AddColumn, AddIndex, DataStep]  # noqa: UP007 - a runtime alias on Python 3.10


def _columns(tx: Tx, table: str) -> set[str]:
    if tx.dialect == "sqlite":
        return {row["name"] for row in tx.all(f"PRAGMA table_info({table})")}
    rows = tx.all(
        "SELECT column_name AS name FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = ?",
        (table,),
    )
    return {row["name"] for row in rows}


def migrate(db: Database) -> list[int]:
    """Apply the migrations this database lacks, in order; safe to run any number of times, from many instances."""
    from . import schema

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
    from . import schema

    lines = [f"-- aichat schema ({dialect}); generated from aichat.store.schema by `make schema`."]
    for version, name, sqlite_steps, mysql_steps in schema.MIGRATIONS:
        lines.append(f"\n-- migration {version}: {name}")
        for step in sqlite_steps if dialect == "sqlite" else mysql_steps:
            text = step if isinstance(step, str) else step.sql()
            lines.append(" ".join(text.split()) + ("" if text.startswith("--") else ";"))
    return "\n".join(lines) + "\n"
