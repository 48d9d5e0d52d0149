-- aichat schema (sqlite); generated from aichat.store.schema by `make schema`.

-- migration 1: users and verification codes
CREATE TABLE IF NOT EXISTS users ( uid TEXT PRIMARY KEY, country_code TEXT NOT NULL, phone_number TEXT NOT NULL, created_at INTEGER NOT NULL, UNIQUE (country_code, phone_number));
CREATE TABLE IF NOT EXISTS verification_codes ( id INTEGER PRIMARY KEY AUTOINCREMENT, country_code TEXT NOT NULL, phone_number TEXT NOT NULL, code_hash TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, client_ip TEXT NOT NULL, source_ip TEXT, provider_request_id TEXT, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_codes_phone ON verification_codes (phone_number, country_code, id);
CREATE INDEX IF NOT EXISTS ix_codes_ip ON verification_codes (client_ip, created_at);
CREATE TABLE IF NOT EXISTS send_cooldowns ( phone_key TEXT PRIMARY KEY, until_ms INTEGER NOT NULL);

-- migration 2: roles and chat messages
CREATE TABLE IF NOT EXISTS roles ( role_code TEXT PRIMARY KEY, nickname TEXT NOT NULL, intro TEXT NOT NULL, avatar_url TEXT NOT NULL, background_url TEXT NOT NULL, opening_message TEXT NOT NULL, system_prompt TEXT NOT NULL, sort_order INTEGER NOT NULL, enabled INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS app_meta ( meta_key TEXT PRIMARY KEY, meta_value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages ( id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, role_code TEXT NOT NULL, sender_role TEXT NOT NULL, content TEXT NOT NULL, has_image INTEGER NOT NULL DEFAULT 0, is_partial INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_messages_conversation ON messages (uid, role_code, id);

-- migration 3: chat rate limits
CREATE TABLE IF NOT EXISTS chat_events ( id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_chat_events_uid ON chat_events (uid, created_at);
CREATE TABLE IF NOT EXISTS stream_slots ( id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_stream_slots_uid ON stream_slots (uid, expires_at);

-- migration 4: usage, reasoning and revoked tokens
ALTER TABLE messages ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE messages ADD COLUMN completion_tokens INTEGER;
ALTER TABLE messages ADD COLUMN reasoning_content TEXT;
CREATE TABLE IF NOT EXISTS revoked_tokens ( jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_revoked_tokens_expiry ON revoked_tokens (expires_at);

-- migration 5: conversations
CREATE TABLE IF NOT EXISTS conversations ( id TEXT PRIMARY KEY, uid TEXT NOT NULL, role_code TEXT NOT NULL, title TEXT NOT NULL DEFAULT '', title_custom INTEGER NOT NULL DEFAULT 0, default_key TEXT, settings TEXT NOT NULL DEFAULT '{}', created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, last_message_at INTEGER, active_at INTEGER NOT NULL, UNIQUE (uid, default_key));
CREATE INDEX IF NOT EXISTS ix_conversations_active ON conversations (uid, active_at, id);
CREATE INDEX IF NOT EXISTS ix_conversations_role ON conversations (uid, role_code, active_at, id);
ALTER TABLE messages ADD COLUMN conversation_id TEXT;
-- data step: every (user, role) history becomes that role's default conversation (ids and order unchanged)
CREATE INDEX ix_messages_conversation_id ON messages (conversation_id, id);

-- migration 6: tool calls and role skills
ALTER TABLE messages ADD COLUMN tool_calls TEXT;
ALTER TABLE roles ADD COLUMN skills TEXT;
CREATE TABLE IF NOT EXISTS tool_runs ( id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, tool TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_tool_runs_uid ON tool_runs (uid, created_at);

-- migration 7: voice clips
ALTER TABLE roles ADD COLUMN voice TEXT;
CREATE TABLE IF NOT EXISTS voice_clips ( id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, message_id INTEGER NOT NULL, voice TEXT NOT NULL, text_hash TEXT NOT NULL, status TEXT NOT NULL, store_key TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, UNIQUE (message_id, voice, text_hash));
CREATE INDEX IF NOT EXISTS ix_voice_clips_uid ON voice_clips (uid);
CREATE TABLE IF NOT EXISTS voice_events ( id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, chars INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_voice_events_uid ON voice_events (uid, created_at);

-- migration 8: password accounts, sessions and refresh tokens
-- data step: users: the phone becomes optional (password accounts), with username, email, profile and password
CREATE TABLE IF NOT EXISTS sessions ( id TEXT PRIMARY KEY, uid TEXT NOT NULL, created_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, client_ip TEXT NOT NULL, user_agent TEXT NOT NULL, revoked_at INTEGER);
CREATE INDEX IF NOT EXISTS ix_sessions_uid ON sessions (uid);
CREATE TABLE IF NOT EXISTS refresh_tokens ( token_hash TEXT PRIMARY KEY, session_id TEXT NOT NULL, uid TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER);
CREATE INDEX IF NOT EXISTS ix_refresh_tokens_session ON refresh_tokens (session_id);
CREATE TABLE IF NOT EXISTS login_failures ( id INTEGER PRIMARY KEY AUTOINCREMENT, account_key TEXT NOT NULL, client_ip TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_login_failures_account ON login_failures (account_key, created_at);
CREATE INDEX IF NOT EXISTS ix_login_failures_ip ON login_failures (client_ip, created_at);

-- migration 9: idempotency keys
CREATE TABLE IF NOT EXISTS idempotency_keys ( uid TEXT NOT NULL, idem_key TEXT NOT NULL, request_hash TEXT NOT NULL, operation TEXT NOT NULL, status TEXT NOT NULL, conversation_id TEXT, user_message_id INTEGER, reply_message_id INTEGER, error_code TEXT, error_message TEXT, response TEXT, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (uid, idem_key));
