"""The database: SQLite or MySQL behind one small interface (pool, transactions, the dialect's differences)."""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import ApiError
from .budget import wait_allowed
from .tx import Tx, _SqliteConnection

log = logging.getLogger("aichat.store")

T = TypeVar("T")


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
                self._path,
                timeout=wait_allowed(self._connect_timeout_s),  # a connect inside a request spends its budget too
                isolation_level=None,
                check_same_thread=False,
                factory=_SqliteConnection,
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
            connect_timeout=wait_allowed(self._connect_timeout_s),
            read_timeout=self._read_timeout_s,
            write_timeout=self._read_timeout_s,
            # Each user's writes are already serialised by a row lock on the user; REPEATABLE READ's gap
            # locks would only add deadlocks between different users' inserts.
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            **tls,
        )

    def _borrow(self) -> tuple[Any, bool]:
        """A connection from the pool (and whether it was pooled rather than fresh); waits while all are out."""
        deadline = time.monotonic() + wait_allowed(self._connect_timeout_s)
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
                self._bound_waits(conn)
            except ApiError:
                raise
            except Exception as exc:
                raise _failure("database unavailable", exc) from exc
            try:
                result = work(Tx(conn, self.dialect))
            except Exception as exc:
                if not _is_driver_error(exc):
                    self._give_back(conn)
                    raise
                self._forget(conn)
                if attempt == 1 and pooled:
                    continue
                raise _failure("database error", exc) from exc
            self._give_back(conn)
            return result
        raise AssertionError("unreachable")

    def _bound_waits(self, conn: Any) -> None:
        """Cap this connection's waits at what the request's budget has left (its own timeouts otherwise)."""
        if self.dialect == "sqlite":
            allowed = round(wait_allowed(self._connect_timeout_s), 1)
            if conn.aichat_busy_s != allowed:
                conn.execute(f"PRAGMA busy_timeout = {int(allowed * 1000)}")
                conn.aichat_busy_s = allowed
            return
        allowed = wait_allowed(self._read_timeout_s)
        conn._read_timeout = conn._write_timeout = allowed  # PyMySQL applies them before each socket wait

    def _begin(self) -> Any:
        """Borrow a connection and start a transaction on it.

        A pooled connection the server has dropped meanwhile (wait_timeout, failover, a cut) fails right
        here, before anything ran: it is replaced once by a fresh one, so callers never see it.
        """
        for attempt in (1, 2):
            conn = None
            try:
                conn, pooled = self._borrow()
                self._bound_waits(conn)
                conn.execute("BEGIN IMMEDIATE") if self.dialect == "sqlite" else conn.begin()
                return conn
            except ApiError:
                raise
            except Exception as exc:
                if conn is not None:  # (a failed connect was already uncounted by _borrow)
                    self._forget(conn)
                if attempt == 1 and conn is not None and pooled and self.dialect == "mysql":
                    continue
                raise _failure("database unavailable", exc) from exc
        raise AssertionError("unreachable")

    @contextmanager
    def session(self) -> Iterator[Tx]:
        """A pooled connection in autocommit mode, for work that manages its own transactions (migrations)."""
        try:
            conn, _ = self._borrow()
        except ApiError:
            raise
        except Exception as exc:
            raise _failure("database unavailable", exc) from exc
        try:
            yield Tx(conn, self.dialect)
        except Exception as exc:
            self._forget(conn)
            if _is_driver_error(exc):
                raise _failure("database error", exc) from exc
            raise
        except BaseException:
            self._forget(conn)
            raise
        else:
            self._give_back(conn)

    def migrate(self) -> list[int]:
        """Apply the migrations this database lacks (aichat.store.migrations)."""
        from .migrations import migrate

        return migrate(self)

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
                raise _failure("database error", exc) from exc
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


def _failure(what: str, exc: BaseException) -> ApiError:
    """Log a driver failure (type and a short detail, never the SQL's values) and make it the contract's error."""
    log.error(what, extra={"error": type(exc).__name__, "detail": str(exc)[:200]})
    return ApiError("DatabaseError")


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
