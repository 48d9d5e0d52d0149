-- aichat schema (mysql); generated from aichat.store.MIGRATIONS by `make schema`.

-- migration 1: users and verification codes
CREATE TABLE IF NOT EXISTS users ( uid CHAR(24) NOT NULL PRIMARY KEY, country_code VARCHAR(4) NOT NULL, phone_number VARCHAR(15) NOT NULL, created_at BIGINT NOT NULL, UNIQUE KEY uq_users_phone (country_code, phone_number)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS verification_codes ( id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, country_code VARCHAR(4) NOT NULL, phone_number VARCHAR(15) NOT NULL, code_hash CHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, attempts INT NOT NULL DEFAULT 0, client_ip VARCHAR(64) NOT NULL, source_ip VARCHAR(64) NULL, provider_request_id VARCHAR(128) NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, KEY ix_codes_phone (phone_number, country_code, id), KEY ix_codes_ip (client_ip, created_at)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE IF NOT EXISTS send_cooldowns ( phone_key VARCHAR(24) NOT NULL PRIMARY KEY, until_ms BIGINT NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
