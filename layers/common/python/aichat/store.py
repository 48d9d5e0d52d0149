"""The database: SQLite or MySQL behind one small interface, with idempotent schema migrations."""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from .errors import ApiError

log = logging.getLogger("aichat.store")

Row = dict[str, Any]
T = TypeVar("T")


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the unit every timestamp column uses."""
    return int(time.time() * 1000)


# Each migration is (version, name, sqlite statements, mysql statements). Append only: a deployed
# database has applied the earlier ones. Timestamps are epoch milliseconds (BIGINT) in both dialects.
_MYSQL_TABLE = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
MIGRATIONS: list[tuple[int, str, list[str], list[str]]] = [
    (
        1,
        "users and verification codes",
        [
            """CREATE TABLE IF NOT EXISTS users (
                uid TEXT PRIMARY KEY,
                country_code TEXT NOT NULL,
                phone_number TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                UNIQUE (country_code, phone_number))""",
            """CREATE TABLE IF NOT EXISTS verification_codes (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                country_code TEXT NOT NULL,
                phone_number TEXT NOT NULL,
                code_hash TEXT NOT NULL,
                status TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                client_ip TEXT NOT NULL,
                source_ip TEXT,
                provider_request_id TEXT,
                created_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_codes_phone ON verification_codes (phone_number, country_code, id)",
            "CREATE INDEX IF NOT EXISTS ix_codes_ip ON verification_codes (client_ip, created_at)",
            """CREATE TABLE IF NOT EXISTS send_cooldowns (
                phone_key TEXT PRIMARY KEY,
                until_ms INTEGER NOT NULL)""",
        ],
        [
            """CREATE TABLE IF NOT EXISTS users (
                uid CHAR(24) NOT NULL PRIMARY KEY,
                country_code VARCHAR(4) NOT NULL,
                phone_number VARCHAR(15) NOT NULL,
                created_at BIGINT NOT NULL,
                UNIQUE KEY uq_users_phone (country_code, phone_number))"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS verification_codes (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                country_code VARCHAR(4) NOT NULL,
                phone_number VARCHAR(15) NOT NULL,
                code_hash CHAR(64) NOT NULL,
                status VARCHAR(16) NOT NULL,
                attempts INT NOT NULL DEFAULT 0,
                client_ip VARCHAR(64) NOT NULL,
                source_ip VARCHAR(64) NULL,
                provider_request_id VARCHAR(128) NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                KEY ix_codes_phone (phone_number, country_code, id),
                KEY ix_codes_ip (client_ip, created_at))"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS send_cooldowns (
                phone_key VARCHAR(24) NOT NULL PRIMARY KEY,
                until_ms BIGINT NOT NULL)"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        2,
        "roles and chat messages",
        [
            """CREATE TABLE IF NOT EXISTS roles (
                role_code TEXT PRIMARY KEY,
                nickname TEXT NOT NULL,
                intro TEXT NOT NULL,
                avatar_url TEXT NOT NULL,
                background_url TEXT NOT NULL,
                opening_message TEXT NOT NULL,
                system_prompt TEXT NOT NULL,
                sort_order INTEGER NOT NULL,
                enabled INTEGER NOT NULL,
                updated_at INTEGER NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS app_meta (
                meta_key TEXT PRIMARY KEY,
                meta_value TEXT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                uid TEXT NOT NULL,
                role_code TEXT NOT NULL,
                sender_role TEXT NOT NULL,
                content TEXT NOT NULL,
                has_image INTEGER NOT NULL DEFAULT 0,
                is_partial INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_messages_conversation ON messages (uid, role_code, id)",
        ],
        [
            """CREATE TABLE IF NOT EXISTS roles (
                role_code VARCHAR(64) NOT NULL PRIMARY KEY,
                nickname VARCHAR(64) NOT NULL,
                intro TEXT NOT NULL,
                avatar_url TEXT NOT NULL,
                background_url TEXT NOT NULL,
                opening_message TEXT NOT NULL,
                system_prompt MEDIUMTEXT NOT NULL,
                sort_order INT NOT NULL,
                enabled TINYINT(1) NOT NULL,
                updated_at BIGINT NOT NULL)"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS app_meta (
                meta_key VARCHAR(64) NOT NULL PRIMARY KEY,
                meta_value TEXT NOT NULL)"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS messages (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                role_code VARCHAR(64) NOT NULL,
                sender_role VARCHAR(16) NOT NULL,
                content MEDIUMTEXT NOT NULL,
                has_image TINYINT(1) NOT NULL DEFAULT 0,
                is_partial TINYINT(1) NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                KEY ix_messages_conversation (uid, role_code, id))"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        3,
        "chat rate limits",
        [
            """CREATE TABLE IF NOT EXISTS chat_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                uid TEXT NOT NULL,
                created_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_chat_events_uid ON chat_events (uid, created_at)",
            """CREATE TABLE IF NOT EXISTS stream_slots (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                uid TEXT NOT NULL,
                expires_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_stream_slots_uid ON stream_slots (uid, expires_at)",
        ],
        [
            """CREATE TABLE IF NOT EXISTS chat_events (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                created_at BIGINT NOT NULL,
                KEY ix_chat_events_uid (uid, created_at))"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS stream_slots (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                expires_at BIGINT NOT NULL,
                KEY ix_stream_slots_uid (uid, expires_at))"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        4,
        "usage, reasoning and revoked tokens",
        [
            "ALTER TABLE messages ADD COLUMN prompt_tokens INTEGER",
            "ALTER TABLE messages ADD COLUMN completion_tokens INTEGER",
            "ALTER TABLE messages ADD COLUMN reasoning_content TEXT",
            """CREATE TABLE IF NOT EXISTS revoked_tokens (
                jti TEXT PRIMARY KEY,
                expires_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_revoked_tokens_expiry ON revoked_tokens (expires_at)",
        ],
        [
            "ALTER TABLE messages ADD COLUMN prompt_tokens INT NULL, ADD COLUMN completion_tokens INT NULL,"
            " ADD COLUMN reasoning_content MEDIUMTEXT NULL",
            """CREATE TABLE IF NOT EXISTS revoked_tokens (
                jti CHAR(32) NOT NULL PRIMARY KEY,
                expires_at BIGINT NOT NULL,
                KEY ix_revoked_tokens_expiry (expires_at))"""
            + _MYSQL_TABLE,
        ],
    ),
]


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

    @property
    def for_update(self) -> str:
        """The row-lock suffix for a SELECT (SQLite locks the whole file on BEGIN IMMEDIATE instead)."""
        return " FOR UPDATE" if self.dialect == "mysql" else ""


def is_duplicate_key(exc: BaseException) -> bool:
    """Whether a driver error is a unique-key violation."""
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return getattr(exc, "args", (None,))[0] == 1062  # MySQL ER_DUP_ENTRY


class Database:
    """A lazily connected database behind a small shared pool, reused across warm invocations.

    A transaction borrows a connection and gives it back when it ends, so a stream that relays for
    minutes holds none, and an instance never opens more than `pool_size` connections (MySQL's
    max_connections is shared by every instance).
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        pool_size: int = 16,
        tls: bool = False,
        auto_migrate: bool = True,
    ) -> None:
        self.url = url
        # Migrating on first use means a fresh database, or one that was down at start, needs no extra step.
        self._schema_ready = not auto_migrate
        self._schema_lock = threading.Lock()
        self.dialect = "mysql" if url.startswith("mysql://") else "sqlite"
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._pool_size = pool_size
        self._idle: list[Any] = []  # LIFO: the most recently used connection is the likeliest to be alive
        self._open = 0  # connections in existence (idle + borrowed)
        self._pool = threading.Condition()
        # One TLS context for every connect: building one per connect costs ~25 ms of CPU (CA bundle load).
        self._ssl = ssl.create_default_context() if tls and self.dialect == "mysql" else None
        if self.dialect == "sqlite":
            self._path = url[len("sqlite:///") :]
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(
                self._path, timeout=self._connect_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        import pymysql  # imported here: SQLite-only runs never pay for it

        parts = urlsplit(self.url)
        tls: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {"ssl_disabled": True}
        return pymysql.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=parts.path.lstrip("/") or None,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            write_timeout=self._read_timeout_s,
            # Each user's writes are already serialised by a row lock on the user; REPEATABLE READ's gap
            # locks would only add deadlocks between different users' inserts.
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            **tls,
        )

    def _borrow(self) -> tuple[Any, bool]:
        """A connection from the pool (and whether it was pooled rather than fresh); waits while all are out."""
        deadline = time.monotonic() + self._connect_timeout_s
        with self._pool:
            while not self._idle and self._open >= self._pool_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.error("database pool exhausted", extra={"pool_size": self._pool_size})
                    raise ApiError("DatabaseError")
                self._pool.wait(remaining)
            if self._idle:
                return self._idle.pop(), True
            self._open += 1
        try:
            return self._connect(), False
        except BaseException:
            self._forget(None)
            raise

    def _give_back(self, conn: Any) -> None:
        with self._pool:
            self._idle.append(conn)
            self._pool.notify()

    def _forget(self, conn: Any) -> None:
        """Drop a broken (or never opened) connection from the pool's count."""
        with self._pool:
            self._open -= 1
            self._pool.notify()
        if conn is not None:
            _close_quietly(conn)

    def close_idle(self) -> None:
        """Close the connections no request is using (FC's preStop); borrowed ones finish their work."""
        with self._pool:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._pool.notify_all()
        for conn in idle:
            _close_quietly(conn)
        log.info("idle database connections closed", extra={"closed": len(idle)})

    def close(self) -> None:
        """Close every idle connection (tests, tools: call it when nothing is running)."""
        self.close_idle()

    def warm(self) -> None:
        """Migrate and open a connection now rather than on the first request; a failure is only logged."""
        try:
            with self.tx() as tx:
                tx.one("SELECT 1 AS ok")
        except ApiError:
            # An instance must still start while the database is down: requests answer DatabaseError.
            log.warning("database warm-up failed; will retry on the first request")

    # -- transactions ------------------------------------------------------------------------------
    def tx(self) -> Any:
        """One transaction: committed when the block ends, rolled back if it raises.

        Driver failures become ApiError("DatabaseError"); a broken connection is dropped, so the next
        request reconnects.
        """
        self._ensure_schema()
        return self._tx()

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            with self._schema_lock:
                if not self._schema_ready:
                    self.migrate()
                    self._schema_ready = True

    def read(self, work: Callable[[Tx], T]) -> T:
        """Run read-only statements; on MySQL without BEGIN/COMMIT (autocommit): two round trips fewer.

        A pooled connection that turns out to be dead is replaced once and `work` runs again (reading
        twice is harmless), so callers never see a connection the server dropped while it sat idle.
        """
        if self.dialect == "sqlite":
            # Measured: many threads reading one WAL file in autocommit contend on its read locks and back
            # off in sleeps (history throughput fell by half); a transaction per read is faster here.
            with self.tx() as tx:
                return work(tx)
        self._ensure_schema()
        for attempt in (1, 2):
            try:
                conn, pooled = self._borrow()
            except ApiError:
                raise
            except Exception as exc:
                log.error("database unavailable", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})
                raise ApiError("DatabaseError") from exc
            try:
                result = work(Tx(conn, self.dialect))
            except Exception as exc:
                if not _is_driver_error(exc):
                    self._give_back(conn)
                    raise
                self._forget(conn)
                if attempt == 1 and pooled:
                    continue
                log.error("database error", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})
                raise ApiError("DatabaseError") from exc
            self._give_back(conn)
            return result
        raise AssertionError("unreachable")

    def _begin(self) -> Any:
        """Borrow a connection and start a transaction on it.

        A pooled connection the server has dropped meanwhile (wait_timeout, failover, a cut) fails right
        here, before anything ran: it is replaced once by a fresh one, so callers never see it.
        """
        for attempt in (1, 2):
            conn = None
            try:
                conn, pooled = self._borrow()
                conn.execute("BEGIN IMMEDIATE") if self.dialect == "sqlite" else conn.begin()
                return conn
            except ApiError:
                raise
            except Exception as exc:
                if conn is not None:  # (a failed connect was already uncounted by _borrow)
                    self._forget(conn)
                if attempt == 1 and conn is not None and pooled and self.dialect == "mysql":
                    continue
                log.error("database unavailable", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})
                raise ApiError("DatabaseError") from exc
        raise AssertionError("unreachable")

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        conn = self._begin()
        try:
            yield Tx(conn, self.dialect)
        except ApiError:
            self._end(conn, commit=False)
            raise
        except Exception as exc:
            self._end(conn, commit=False)
            if _is_driver_error(exc):
                log.error("database error", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})
                raise ApiError("DatabaseError") from exc
            raise
        except BaseException:
            self._end(conn, commit=False)
            raise
        else:
            if not self._end(conn, commit=True):
                raise ApiError("DatabaseError")

    def _end(self, conn: Any, *, commit: bool) -> bool:
        """Commit or roll back and return the connection to the pool (or drop it if it broke)."""
        try:
            if self.dialect == "sqlite":
                conn.execute("COMMIT" if commit else "ROLLBACK")
            else:
                conn.commit() if commit else conn.rollback()
        except Exception as exc:  # noqa: BLE001 - a broken connection is dropped; a failed commit is reported
            self._forget(conn)
            log.error("commit failed" if commit else "rollback failed", extra={"error": type(exc).__name__})
            return False
        self._give_back(conn)
        return True

    # -- schema ------------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply the migrations this database lacks, in order; safe to run any number of times."""
        applied: list[int] = []
        with self._tx() as tx:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name "
                + ("TEXT" if self.dialect == "sqlite" else "VARCHAR(200)")
                + " NOT NULL, applied_at BIGINT NOT NULL)"
            )
        for version, name, sqlite_sql, mysql_sql in MIGRATIONS:
            with self._tx() as tx:
                if self.dialect == "mysql":
                    # Serialise concurrent migrators (several instances starting at once).
                    tx.one("SELECT GET_LOCK('aichat_migrate', 30) AS got")
                try:
                    if tx.one("SELECT version FROM schema_migrations WHERE version = ?", (version,)):
                        continue
                    for statement in sqlite_sql if self.dialect == "sqlite" else mysql_sql:
                        tx.execute(statement)
                    tx.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, now_ms()),
                    )
                    applied.append(version)
                finally:
                    if self.dialect == "mysql":
                        tx.one("SELECT RELEASE_LOCK('aichat_migrate') AS released")
        if applied:
            log.info("migrations applied", extra={"versions": applied})
        return applied


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        log.debug("closing a connection failed", exc_info=True)


def _is_driver_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    module = type(exc).__module__ or ""
    return module.startswith("pymysql") or isinstance(exc, (OSError, ConnectionError))


def ddl(dialect: str) -> str:
    """The whole schema as one SQL script, for operators who create tables by hand."""
    lines = [f"-- aichat schema ({dialect}); generated from aichat.store.MIGRATIONS by `make schema`."]
    for version, name, sqlite_sql, mysql_sql in MIGRATIONS:
        lines.append(f"\n-- migration {version}: {name}")
        for statement in sqlite_sql if dialect == "sqlite" else mysql_sql:
            lines.append(" ".join(statement.split()) + ";")
    return "\n".join(lines) + "\n"


class UnconfiguredDatabase:
    """Stands in when no AICHAT_DB_URL is set: every use answers 500 MissingDatabaseConfig."""

    dialect = "none"

    def tx(self) -> Any:
        """Refuse: there is no database to talk to."""
        raise ApiError("MissingDatabaseConfig")

    def read(self, work: Any) -> Any:
        """Refuse: there is no database to talk to."""
        raise ApiError("MissingDatabaseConfig")

    def migrate(self) -> list[int]:
        """Refuse: there is no database to migrate."""
        raise ApiError("MissingDatabaseConfig")

    def warm(self) -> None:
        """Nothing to warm."""

    def close(self) -> None:
        """Nothing to close."""

    def close_idle(self) -> None:
        """Nothing to close."""


def open_database(settings: Any) -> Database | UnconfiguredDatabase:
    """The database the settings name (connected lazily), or a stand-in that reports the missing config."""
    if not settings.db_url:
        log.error("AICHAT_DB_URL is not set; database operations answer MissingDatabaseConfig")
        return UnconfiguredDatabase()
    return Database(
        settings.db_url,
        connect_timeout_s=settings.db_connect_timeout_s,
        read_timeout_s=settings.db_read_timeout_s,
        pool_size=settings.db_pool_size,
        tls=settings.db_tls,
    )
