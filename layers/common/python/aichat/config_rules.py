"""The rules Settings must satisfy; a broken one stops the service at start with the variable's name."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .config import (
    AUDIO_STORES,
    ENVIRONMENTS,
    LOG_LEVELS,
    MAY_BE_ZERO,
    MIN_PRODUCTION_SECRET_BYTES,
    NEWS_SOURCES,
    SMS_PROVIDERS,
    TTS_PROVIDERS,
    WEATHER_PROVIDERS,
    ConfigError,
    env_name,
)

if TYPE_CHECKING:
    from .config import Settings


def check(settings: Settings) -> None:
    """Raise ConfigError for the first setting the services cannot run with."""
    if settings.env not in ENVIRONMENTS:
        raise ConfigError(f"AICHAT_ENV must be one of {', '.join(ENVIRONMENTS)}")
    if not settings.jwt_secret:
        raise ConfigError("AICHAT_JWT_SECRET is required (make run generates one for local use)")
    if settings.sms_provider not in SMS_PROVIDERS:
        raise ConfigError(f"AICHAT_SMS_PROVIDER must be one of {', '.join(SMS_PROVIDERS)}")
    if settings.roles_file and not os.path.isfile(settings.roles_file):
        raise ConfigError(f"AICHAT_ROLES_FILE does not exist: {settings.roles_file}")
    if settings.db_url and not settings.db_url.startswith(("sqlite:///", "mysql://")):
        raise ConfigError("AICHAT_DB_URL must start with sqlite:/// or mysql://")
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"AICHAT_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    if settings.weather_provider not in WEATHER_PROVIDERS:
        raise ConfigError(f"AICHAT_WEATHER_PROVIDER must be one of {', '.join(WEATHER_PROVIDERS)}")
    unknown = [source for source in settings.news_sources if source not in NEWS_SOURCES]
    if unknown:
        raise ConfigError(f"AICHAT_NEWS_SOURCES: unknown source {unknown[0]!r} (known: {', '.join(NEWS_SOURCES)})")
    for name in ("amap_base_url", "qweather_base_url", "baidu_base_url", "toutiao_base_url"):
        value = getattr(settings, name)
        if value and not value.startswith(("https://", "http://")):
            raise ConfigError(f"{env_name(name)} must be an http(s) URL")
    if settings.tts_provider not in TTS_PROVIDERS:
        raise ConfigError(f"AICHAT_TTS_PROVIDER must be one of {', '.join(TTS_PROVIDERS)}")
    if settings.audio_store not in AUDIO_STORES:
        raise ConfigError(f"AICHAT_AUDIO_STORE must be one of {', '.join(AUDIO_STORES)}")
    if settings.audio_store == "oss" and not (settings.oss_endpoint and settings.oss_bucket and settings.oss_region):
        raise ConfigError("AICHAT_AUDIO_STORE=oss needs AICHAT_OSS_ENDPOINT, AICHAT_OSS_BUCKET and AICHAT_OSS_REGION")
    if settings.oss_endpoint and not settings.oss_endpoint.startswith(("https://", "http://")):
        raise ConfigError("AICHAT_OSS_ENDPOINT must be an http(s) URL")
    if not settings.dashscope_base_url.startswith(("https://", "http://")):
        raise ConfigError("AICHAT_DASHSCOPE_BASE_URL must be an http(s) URL")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("AICHAT_REDIS_URL must start with redis://, rediss:// (TLS) or unix://")
    if settings.tool_max_rounds > 10:
        raise ConfigError("AICHAT_TOOL_MAX_ROUNDS must be at most 10")
    for origin in settings.cors_origins:
        if origin != "*" and (origin.endswith("/") or "://" not in origin):
            raise ConfigError(f"AICHAT_CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no slash)")
    if settings.llm_model not in settings.llm_models:
        raise ConfigError("AICHAT_LLM_MODELS must include AICHAT_LLM_MODEL")
    try:
        ZoneInfo(settings.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"AICHAT_TIMEZONE is not a known time zone: {settings.timezone}") from exc
    # Every number must be positive but the resend cooldown (0 turns it off).
    for item in fields(settings):
        if item.type in ("int", "float") and item.name not in MAY_BE_ZERO and getattr(settings, item.name) <= 0:
            raise ConfigError(f"{env_name(item.name)} must be positive")
    if settings.code_resend_cooldown_s < 0:
        raise ConfigError("AICHAT_CODE_RESEND_COOLDOWN must not be negative")
    if settings.is_production and len(settings.jwt_secret.encode()) < MIN_PRODUCTION_SECRET_BYTES:
        raise ConfigError(f"AICHAT_JWT_SECRET must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes in production")
    if settings.is_production and settings.service == "login":
        if settings.sms_provider == "console":
            raise ConfigError("the console SMS provider is for local runs only; use dysms in production")
        if not (settings.sms_sign_name and settings.sms_template_code):
            raise ConfigError("AICHAT_SMS_SIGN_NAME and AICHAT_SMS_TEMPLATE_CODE are required in production")
