"""The kinds of migration step; each is idempotent (a re-run after a crash completes what is missing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from .tx import Tx

# What every MySQL table is created with.
MYSQL_TABLE = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"


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
    """CREATE [UNIQUE] INDEX on an existing table, skipped when the index exists already."""

    table: str
    name: str
    columns: str
    unique: bool = False

    def sql(self) -> str:
        """The statement, for `make schema`."""
        return f"CREATE {'UNIQUE ' if self.unique else ''}INDEX {self.name} ON {self.table} ({self.columns})"

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
