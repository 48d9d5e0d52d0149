"""The database (SQLite or MySQL), its schema and migrations."""

from .database import Database, Row, Tx, UnconfiguredDatabase, is_duplicate_key, now_ms, open_database
from .migrations import ddl

__all__ = ["Database", "Row", "Tx", "UnconfiguredDatabase", "ddl", "is_duplicate_key", "now_ms", "open_database"]
