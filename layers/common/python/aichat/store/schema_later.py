"""The schema's later migrations (tools, voice, password accounts, idempotency keys): part of
schema.MIGRATIONS, append-only like the rest."""

from __future__ import annotations

from .steps import MYSQL_TABLE as _MYSQL_TABLE
from .steps import AddColumn, AddIndex, DataStep, Step
from .tx import Tx

USERS_V8_SQLITE = """CREATE TABLE users_v8 (
    uid TEXT PRIMARY KEY,
    country_code TEXT,
    phone_number TEXT,
    created_at INTEGER NOT NULL,
    username TEXT,
    username_key TEXT,
    email TEXT,
    email_key TEXT,
    nickname TEXT,
    avatar_url TEXT,
    bio TEXT,
    password_hash TEXT,
    sessions_after INTEGER,
    updated_at INTEGER,
    UNIQUE (country_code, phone_number),
    UNIQUE (username_key),
    UNIQUE (email_key))"""


def _users_accept_password_accounts(tx: Tx) -> None:
    """users: the phone becomes optional (password accounts), with username, email, profile and password"""
    columns = {row["name"] for row in tx.all("PRAGMA table_info(users)")}
    if "username_key" in columns:
        return  # a previous run finished the rebuild
    tx.execute("DROP TABLE IF EXISTS users_v8")
    tx.execute(USERS_V8_SQLITE)
    tx.execute(
        "INSERT INTO users_v8 (uid, country_code, phone_number, created_at)"
        " SELECT uid, country_code, phone_number, created_at FROM users"
    )
    tx.execute("DROP TABLE users")
    tx.execute("ALTER TABLE users_v8 RENAME TO users")


LATER: list[tuple[int, str, list[Step], list[Step]]] = [
    (
        6,
        "tool calls and role skills",
        [
            AddColumn("messages", "tool_calls", "TEXT"),
            AddColumn("roles", "skills", "TEXT"),
            """CREATE TABLE IF NOT EXISTS tool_runs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                uid TEXT NOT NULL,
                tool TEXT NOT NULL,
                created_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_tool_runs_uid ON tool_runs (uid, created_at)",
        ],
        [
            AddColumn("messages", "tool_calls", "MEDIUMTEXT NULL"),
            AddColumn("roles", "skills", "TEXT NULL"),
            """CREATE TABLE IF NOT EXISTS tool_runs (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                tool VARCHAR(64) NOT NULL,
                created_at BIGINT NOT NULL,
                KEY ix_tool_runs_uid (uid, created_at))"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        7,
        "voice clips",
        [
            AddColumn("roles", "voice", "TEXT"),
            """CREATE TABLE IF NOT EXISTS voice_clips (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                uid TEXT NOT NULL,
                message_id INTEGER NOT NULL,
                voice TEXT NOT NULL,
                text_hash TEXT NOT NULL,
                status TEXT NOT NULL,
                store_key TEXT NOT NULL,
                bytes INTEGER NOT NULL,
                created_at INTEGER NOT NULL,
                UNIQUE (message_id, voice, text_hash))""",
            "CREATE INDEX IF NOT EXISTS ix_voice_clips_uid ON voice_clips (uid)",
            """CREATE TABLE IF NOT EXISTS voice_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                uid TEXT NOT NULL,
                chars INTEGER NOT NULL,
                created_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_voice_events_uid ON voice_events (uid, created_at)",
        ],
        [
            AddColumn("roles", "voice", "TEXT NULL"),
            """CREATE TABLE IF NOT EXISTS voice_clips (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                message_id BIGINT NOT NULL,
                voice VARCHAR(64) NOT NULL,
                text_hash CHAR(32) NOT NULL,
                status VARCHAR(16) NOT NULL,
                store_key VARCHAR(255) NOT NULL,
                bytes INT NOT NULL,
                created_at BIGINT NOT NULL,
                UNIQUE KEY uq_voice_clips (message_id, voice, text_hash),
                KEY ix_voice_clips_uid (uid))"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS voice_events (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                chars INT NOT NULL,
                created_at BIGINT NOT NULL,
                KEY ix_voice_events_uid (uid, created_at))"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        8,
        "password accounts, sessions and refresh tokens",
        [
            DataStep(_users_accept_password_accounts),
            """CREATE TABLE IF NOT EXISTS sessions (
                id TEXT PRIMARY KEY,
                uid TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                last_used_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL,
                client_ip TEXT NOT NULL,
                user_agent TEXT NOT NULL,
                revoked_at INTEGER)""",
            "CREATE INDEX IF NOT EXISTS ix_sessions_uid ON sessions (uid)",
            """CREATE TABLE IF NOT EXISTS refresh_tokens (
                token_hash TEXT PRIMARY KEY,
                session_id TEXT NOT NULL,
                uid TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL,
                used_at INTEGER)""",
            "CREATE INDEX IF NOT EXISTS ix_refresh_tokens_session ON refresh_tokens (session_id)",
            """CREATE TABLE IF NOT EXISTS login_failures (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                account_key TEXT NOT NULL,
                client_ip TEXT NOT NULL,
                created_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_login_failures_account ON login_failures (account_key, created_at)",
            "CREATE INDEX IF NOT EXISTS ix_login_failures_ip ON login_failures (client_ip, created_at)",
        ],
        [
            "ALTER TABLE users MODIFY country_code VARCHAR(4) NULL, MODIFY phone_number VARCHAR(15) NULL",
            AddColumn("users", "username", "VARCHAR(64) NULL"),
            AddColumn("users", "username_key", "VARCHAR(96) NULL"),
            AddColumn("users", "email", "VARCHAR(254) NULL"),
            AddColumn("users", "email_key", "VARCHAR(254) NULL"),
            AddColumn("users", "nickname", "VARCHAR(64) NULL"),
            AddColumn("users", "avatar_url", "VARCHAR(512) NULL"),
            AddColumn("users", "bio", "VARCHAR(400) NULL"),
            AddColumn("users", "password_hash", "VARCHAR(255) NULL"),
            AddColumn("users", "sessions_after", "BIGINT NULL"),
            AddColumn("users", "updated_at", "BIGINT NULL"),
            AddIndex("users", "uq_users_username", "username_key", unique=True),
            AddIndex("users", "uq_users_email", "email_key", unique=True),
            """CREATE TABLE IF NOT EXISTS sessions (
                id CHAR(24) NOT NULL PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                created_at BIGINT NOT NULL,
                last_used_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                client_ip VARCHAR(64) NOT NULL,
                user_agent VARCHAR(255) NOT NULL,
                revoked_at BIGINT NULL,
                KEY ix_sessions_uid (uid))"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS refresh_tokens (
                token_hash CHAR(64) NOT NULL PRIMARY KEY,
                session_id CHAR(24) NOT NULL,
                uid CHAR(24) NOT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                used_at BIGINT NULL,
                KEY ix_refresh_tokens_session (session_id))"""
            + _MYSQL_TABLE,
            """CREATE TABLE IF NOT EXISTS login_failures (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                account_key VARCHAR(254) NOT NULL,
                client_ip VARCHAR(64) NOT NULL,
                created_at BIGINT NOT NULL,
                KEY ix_login_failures_account (account_key, created_at),
                KEY ix_login_failures_ip (client_ip, created_at))"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        9,
        "idempotency keys",
        [
            """CREATE TABLE IF NOT EXISTS idempotency_keys (
                uid TEXT NOT NULL,
                idem_key TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                operation TEXT NOT NULL,
                status TEXT NOT NULL,
                conversation_id TEXT,
                user_message_id INTEGER,
                reply_message_id INTEGER,
                error_code TEXT,
                error_message TEXT,
                response TEXT,
                created_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL,
                PRIMARY KEY (uid, idem_key))""",
        ],
        [
            """CREATE TABLE IF NOT EXISTS idempotency_keys (
                uid CHAR(24) NOT NULL,
                idem_key VARCHAR(64) NOT NULL,
                request_hash CHAR(64) NOT NULL,
                operation VARCHAR(32) NOT NULL,
                status VARCHAR(16) NOT NULL,
                conversation_id CHAR(24) NULL,
                user_message_id BIGINT NULL,
                reply_message_id BIGINT NULL,
                error_code VARCHAR(64) NULL,
                error_message VARCHAR(255) NULL,
                response MEDIUMTEXT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                PRIMARY KEY (uid, idem_key))"""
            + _MYSQL_TABLE,
        ],
    ),
]
