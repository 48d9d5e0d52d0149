"""The schema: an append-only list of migrations (a deployed database has applied the earlier ones)."""

from __future__ import annotations

import secrets

from .schema_later import LATER
from .steps import MYSQL_TABLE, AddColumn, AddIndex, DataStep, Step
from .tx import Tx


def adopt_orphan_messages(tx: Tx) -> None:
    """Messages without a conversation (written by a release before conversations) join their default one."""
    if tx.one("SELECT id FROM messages WHERE conversation_id IS NULL LIMIT 1"):
        _default_conversations(tx)


def _default_conversations(tx: Tx) -> None:
    """every (user, role) history becomes that role's default conversation (ids and order unchanged)"""
    groups = tx.all(
        "SELECT uid, role_code, MIN(created_at) AS first_at, MAX(created_at) AS last_at FROM messages"
        " WHERE conversation_id IS NULL GROUP BY uid, role_code"
    )
    for group in groups:
        uid, role_code = group["uid"], group["role_code"]
        row = tx.one("SELECT id FROM conversations WHERE uid = ? AND default_key = ?", (uid, role_code))
        if row is None:
            first = tx.one(
                "SELECT content FROM messages WHERE uid = ? AND role_code = ? AND sender_role = 'user'"
                " ORDER BY id LIMIT 1",
                (uid, role_code),
            )
            conversation_id = secrets.token_hex(12)
            tx.execute(
                "INSERT INTO conversations (id, uid, role_code, title, title_custom, default_key, settings,"
                " created_at, updated_at, last_message_at, active_at) VALUES (?, ?, ?, ?, 0, ?, '{}', ?, ?, ?, ?)",
                (
                    conversation_id,
                    uid,
                    role_code,
                    auto_title(first["content"] if first else ""),
                    role_code,
                    group["first_at"],
                    group["last_at"],
                    group["last_at"],
                    group["last_at"],
                ),
            )
        else:
            conversation_id = row["id"]
        tx.execute(
            "UPDATE messages SET conversation_id = ? WHERE uid = ? AND role_code = ? AND conversation_id IS NULL",
            (conversation_id, uid, role_code),
        )


TITLE_AUTO_CHARS = 30


def auto_title(text: str) -> str:
    """A conversation's title from its first user message: the first line, spaces collapsed, cut short."""
    line = " ".join(text.strip().split("\n", 1)[0].split()) if text else ""
    return line[:TITLE_AUTO_CHARS]


# Each migration is (version, name, sqlite statements, mysql statements). Append only: a deployed
# database has applied the earlier ones. Timestamps are epoch milliseconds (BIGINT) in both dialects.
_MYSQL_TABLE = MYSQL_TABLE
MIGRATIONS: list[tuple[int, str, list[Step], list[Step]]] = [
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
            AddColumn("messages", "prompt_tokens", "INTEGER"),
            AddColumn("messages", "completion_tokens", "INTEGER"),
            AddColumn("messages", "reasoning_content", "TEXT"),
            """CREATE TABLE IF NOT EXISTS revoked_tokens (
                jti TEXT PRIMARY KEY,
                expires_at INTEGER NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS ix_revoked_tokens_expiry ON revoked_tokens (expires_at)",
        ],
        [
            AddColumn("messages", "prompt_tokens", "INT NULL"),
            AddColumn("messages", "completion_tokens", "INT NULL"),
            AddColumn("messages", "reasoning_content", "MEDIUMTEXT NULL"),
            """CREATE TABLE IF NOT EXISTS revoked_tokens (
                jti CHAR(32) NOT NULL PRIMARY KEY,
                expires_at BIGINT NOT NULL,
                KEY ix_revoked_tokens_expiry (expires_at))"""
            + _MYSQL_TABLE,
        ],
    ),
    (
        5,
        "conversations",
        [
            """CREATE TABLE IF NOT EXISTS conversations (
                id TEXT PRIMARY KEY,
                uid TEXT NOT NULL,
                role_code TEXT NOT NULL,
                title TEXT NOT NULL DEFAULT '',
                title_custom INTEGER NOT NULL DEFAULT 0,
                default_key TEXT,
                settings TEXT NOT NULL DEFAULT '{}',
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                last_message_at INTEGER,
                active_at INTEGER NOT NULL,
                UNIQUE (uid, default_key))""",
            "CREATE INDEX IF NOT EXISTS ix_conversations_active ON conversations (uid, active_at, id)",
            "CREATE INDEX IF NOT EXISTS ix_conversations_role ON conversations (uid, role_code, active_at, id)",
            AddColumn("messages", "conversation_id", "TEXT"),
            DataStep(_default_conversations),
            AddIndex("messages", "ix_messages_conversation_id", "conversation_id, id"),
        ],
        [
            """CREATE TABLE IF NOT EXISTS conversations (
                id CHAR(24) NOT NULL PRIMARY KEY,
                uid CHAR(24) NOT NULL,
                role_code VARCHAR(64) NOT NULL,
                title VARCHAR(200) NOT NULL DEFAULT '',
                title_custom TINYINT(1) NOT NULL DEFAULT 0,
                default_key VARCHAR(64) NULL,
                settings TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                last_message_at BIGINT NULL,
                active_at BIGINT NOT NULL,
                UNIQUE KEY uq_conversations_default (uid, default_key),
                KEY ix_conversations_active (uid, active_at, id),
                KEY ix_conversations_role (uid, role_code, active_at, id))"""
            + _MYSQL_TABLE,
            AddColumn("messages", "conversation_id", "CHAR(24) NULL"),
            DataStep(_default_conversations),
            AddIndex("messages", "ix_messages_conversation_id", "conversation_id, id"),
        ],
    ),
    *LATER,
]
