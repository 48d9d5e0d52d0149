"""The database (SQLite or MySQL), its schema and migrations."""

from .budget import request_budget
from .database import Database, UnconfiguredDatabase, open_database
from .migrations import ddl
from .tx import Row, Tx, is_duplicate_key, now_ms

__all__ = [
    "Database",
    "Row",
    "Tx",
    "UnconfiguredDatabase",
    "ddl",
    "is_duplicate_key",
    "now_ms",
    "open_database",
    "request_budget",
]
