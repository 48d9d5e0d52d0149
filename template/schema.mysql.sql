-- aichat schema (mysql); generated from aichat.store.schema by `make schema`.

-- migration 1: users and verification codes
CREATE TABLE IF NOT EXISTS users ( uid CHAR(24) NOT NULL PRIMARY KEY, country_code VARCHAR(4) NOT NULL, phone_number VARCHAR(15) NOT NULL, created_at BIGINT NOT NULL, UNIQUE KEY uq_users_phone (country_code, phone_number)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS verification_codes ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, country_code VARCHAR(4) NOT NULL, phone_number VARCHAR(15) NOT NULL, code_hash CHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, attempts INT NOT NULL DEFAULT 0, client_ip VARCHAR(64) NOT NULL, source_ip VARCHAR(64) NULL, provider_request_id VARCHAR(128) NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, KEY ix_codes_phone (phone_number, country_code, id), KEY ix_codes_ip (client_ip, created_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS send_cooldowns ( phone_key VARCHAR(24) NOT NULL PRIMARY KEY, until_ms BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 2: roles and chat messages
CREATE TABLE IF NOT EXISTS roles ( role_code VARCHAR(64) NOT NULL PRIMARY KEY, nickname VARCHAR(64) NOT NULL, intro TEXT NOT NULL, avatar_url TEXT NOT NULL, background_url TEXT NOT NULL, opening_message TEXT NOT NULL, system_prompt MEDIUMTEXT NOT NULL, sort_order INT NOT NULL, enabled TINYINT(1) NOT NULL, updated_at BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS app_meta ( meta_key VARCHAR(64) NOT NULL PRIMARY KEY, meta_value TEXT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS messages ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, uid CHAR(24) NOT NULL, role_code VARCHAR(64) NOT NULL, sender_role VARCHAR(16) NOT NULL, content MEDIUMTEXT NOT NULL, has_image TINYINT(1) NOT NULL DEFAULT 0, is_partial TINYINT(1) NOT NULL DEFAULT 0, created_at BIGINT NOT NULL, KEY ix_messages_conversation (uid, role_code, id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 3: chat rate limits
CREATE TABLE IF NOT EXISTS chat_events ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, uid CHAR(24) NOT NULL, created_at BIGINT NOT NULL, KEY ix_chat_events_uid (uid, created_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS stream_slots ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, uid CHAR(24) NOT NULL, expires_at BIGINT NOT NULL, KEY ix_stream_slots_uid (uid, expires_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 4: usage, reasoning and revoked tokens
ALTER TABLE messages ADD COLUMN prompt_tokens INT NULL;
ALTER TABLE messages ADD COLUMN completion_tokens INT NULL;
ALTER TABLE messages ADD COLUMN reasoning_content MEDIUMTEXT NULL;
CREATE TABLE IF NOT EXISTS revoked_tokens ( jti CHAR(32) NOT NULL PRIMARY KEY, expires_at BIGINT NOT NULL, KEY ix_revoked_tokens_expiry (expires_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 5: conversations
CREATE TABLE IF NOT EXISTS conversations ( id CHAR(24) NOT NULL PRIMARY KEY, uid CHAR(24) NOT NULL, role_code VARCHAR(64) NOT NULL, title VARCHAR(200) NOT NULL DEFAULT '', title_custom TINYINT(1) NOT NULL DEFAULT 0, default_key VARCHAR(64) NULL, settings TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, last_message_at BIGINT NULL, active_at BIGINT NOT NULL, UNIQUE KEY uq_conversations_default (uid, default_key), KEY ix_conversations_active (uid, active_at, id), KEY ix_conversations_role (uid, role_code, active_at, id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
ALTER TABLE messages ADD COLUMN conversation_id CHAR(24) NULL;
-- data step: every (user, role) history becomes that role's default conversation (ids and order unchanged)
CREATE INDEX ix_messages_conversation_id ON messages (conversation_id, id);

-- migration 6: tool calls and role skills
ALTER TABLE messages ADD COLUMN tool_calls MEDIUMTEXT NULL;
ALTER TABLE roles ADD COLUMN skills TEXT NULL;
CREATE TABLE IF NOT EXISTS tool_runs ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, uid CHAR(24) NOT NULL, tool VARCHAR(64) NOT NULL, created_at BIGINT NOT NULL, KEY ix_tool_runs_uid (uid, created_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 7: voice clips
ALTER TABLE roles ADD COLUMN voice TEXT NULL;
CREATE TABLE IF NOT EXISTS voice_clips ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, uid CHAR(24) NOT NULL, message_id BIGINT NOT NULL, voice VARCHAR(64) NOT NULL, text_hash CHAR(32) NOT NULL, status VARCHAR(16) NOT NULL, store_key VARCHAR(255) NOT NULL, bytes INT NOT NULL, created_at BIGINT NOT NULL, UNIQUE KEY uq_voice_clips (message_id, voice, text_hash), KEY ix_voice_clips_uid (uid)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS voice_events ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, uid CHAR(24) NOT NULL, chars INT NOT NULL, created_at BIGINT NOT NULL, KEY ix_voice_events_uid (uid, created_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 8: password accounts, sessions and refresh tokens
ALTER TABLE users MODIFY country_code VARCHAR(4) NULL, MODIFY phone_number VARCHAR(15) NULL;
ALTER TABLE users ADD COLUMN username VARCHAR(64) NULL;
ALTER TABLE users ADD COLUMN username_key VARCHAR(96) NULL;
ALTER TABLE users ADD COLUMN email VARCHAR(254) NULL;
ALTER TABLE users ADD COLUMN email_key VARCHAR(254) NULL;
ALTER TABLE users ADD COLUMN nickname VARCHAR(64) NULL;
ALTER TABLE users ADD COLUMN avatar_url VARCHAR(512) NULL;
ALTER TABLE users ADD COLUMN bio VARCHAR(400) NULL;
ALTER TABLE users ADD COLUMN password_hash VARCHAR(255) NULL;
ALTER TABLE users ADD COLUMN sessions_after BIGINT NULL;
ALTER TABLE users ADD COLUMN updated_at BIGINT NULL;
CREATE UNIQUE INDEX uq_users_username ON users (username_key);
CREATE UNIQUE INDEX uq_users_email ON users (email_key);
CREATE TABLE IF NOT EXISTS sessions ( id CHAR(24) NOT NULL PRIMARY KEY, uid CHAR(24) NOT NULL, created_at BIGINT NOT NULL, last_used_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, client_ip VARCHAR(64) NOT NULL, user_agent VARCHAR(255) NOT NULL, revoked_at BIGINT NULL, KEY ix_sessions_uid (uid)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS refresh_tokens ( token_hash CHAR(64) NOT NULL PRIMARY KEY, session_id CHAR(24) NOT NULL, uid CHAR(24) NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, used_at BIGINT NULL, KEY ix_refresh_tokens_session (session_id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS login_failures ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, account_key VARCHAR(254) NOT NULL, client_ip VARCHAR(64) NOT NULL, created_at BIGINT NOT NULL, KEY ix_login_failures_account (account_key, created_at), KEY ix_login_failures_ip (client_ip, created_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- migration 9: idempotency keys
CREATE TABLE IF NOT EXISTS idempotency_keys ( uid CHAR(24) NOT NULL, idem_key VARCHAR(64) NOT NULL, request_hash CHAR(64) NOT NULL, operation VARCHAR(32) NOT NULL, status VARCHAR(16) NOT NULL, conversation_id CHAR(24) NULL, user_message_id BIGINT NULL, reply_message_id BIGINT NULL, error_code VARCHAR(64) NULL, error_message VARCHAR(255) NULL, response MEDIUMTEXT NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, PRIMARY KEY (uid, idem_key)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
