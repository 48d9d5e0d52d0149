"""A cursor inside one transaction, with the two dialects' differences (placeholders, locks, duplicate keys)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the unit every timestamp column uses."""
    return int(time.time() * 1000)


class _SqliteConnection(sqlite3.Connection):
    """A SQLite connection that remembers the busy timeout last set on it."""

    aichat_busy_s: float | None = None


class Tx:
    """A cursor inside one transaction; SQL is written with `?` placeholders for both dialects."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self._conn = conn
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        # Our SQL never contains a literal ? or %, so the placeholder swap is safe.
        return sql.replace("?", "%s") if self.dialect == "mysql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement and return the number of rows it changed."""
        cur = self._conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            return cur.rowcount
        finally:
            cur.close()

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an INSERT and return the new row's id."""
        cur = self._conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            return int(cur.lastrowid)
        finally:
            cur.close()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a query and return every row as a dict."""
        cur = self._conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            cur.close()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """Run a query and return its first row, or None."""
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def insert_selected(self, sql: str, params: Sequence[Any] = ()) -> int | None:
        """Run an INSERT … SELECT of at most one row; return the new row's id, or None if nothing was selected."""
        cur = self._conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            return int(cur.lastrowid) if cur.rowcount == 1 else None
        finally:
            cur.close()

    def insert_unique(self, sql: str, params: Sequence[Any] = ()) -> int | None:
        """Run an INSERT; return the new row's id (0 for a table without one on MySQL), or None when a unique
        key already holds those values.

        Both dialects keep the transaction usable after a duplicate-key error, so callers can go on.
        """
        try:
            return self.insert(sql, params)
        except Exception as exc:
            if is_duplicate_key(exc):
                return None
            raise

    def upsert(self, table: str, key: dict[str, Any], values: dict[str, Any]) -> None:
        """Set `values` on the row with `key`, creating it if absent (race-safe across instances)."""
        assignments = ", ".join(f"{name} = ?" for name in values)
        where = " AND ".join(f"{name} = ?" for name in key)
        update = (f"UPDATE {table} SET {assignments} WHERE {where}", (*values.values(), *key.values()))
        if self.execute(*update):
            return
        columns = {**key, **values}
        inserted = self.insert_unique(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            tuple(columns.values()),
        )
        if inserted is None:  # another transaction inserted it a moment ago; ours updates it
            self.execute(*update)

    def begin(self) -> None:
        """Start a transaction on a session's connection (migrations)."""
        self._conn.execute("BEGIN IMMEDIATE") if self.dialect == "sqlite" else self._conn.begin()

    def commit(self) -> None:
        """Commit a transaction begun with begin()."""
        self._conn.execute("COMMIT") if self.dialect == "sqlite" else self._conn.commit()

    def rollback(self) -> None:
        """Roll back a transaction begun with begin()."""
        self._conn.execute("ROLLBACK") if self.dialect == "sqlite" else self._conn.rollback()

    @property
    def for_update(self) -> str:
        """The row-lock suffix for a SELECT (SQLite locks the whole file on BEGIN IMMEDIATE instead)."""
        return " FOR UPDATE" if self.dialect == "mysql" else ""


def is_duplicate_key(exc: BaseException) -> bool:
    """Whether a driver error is a unique-key violation."""
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return getattr(exc, "args", (None,))[0] == 1062  # MySQL ER_DUP_ENTRY
