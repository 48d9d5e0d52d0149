"""Every setting the services read, in one place, built from the environment and validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from zoneinfo import ZoneInfo

KIB = 1024
MIB = 1024 * KIB

# Dysmsapi's public endpoint; tests point the real SDK at a loopback fake instead.
DEFAULT_SMS_ENDPOINT = "dysmsapi.aliyuncs.com"
# DashScope's OpenAI-compatible mode is the default upstream.
DEFAULT_LLM_BASE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
# DashScope's native API (text-to-speech).
DEFAULT_DASHSCOPE_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"

ENVIRONMENTS = ("local", "test", "production")
SMS_PROVIDERS = ("dysms", "console")
WEATHER_PROVIDERS = ("amap", "qweather")
NEWS_SOURCES = ("baidu", "toutiao")
TTS_PROVIDERS = ("qwen", "cosyvoice")
AUDIO_STORES = ("local", "oss")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_PRODUCTION_SECRET_BYTES = 32


# The numeric settings 0 is valid for.
MAY_BE_ZERO = frozenset({"code_resend_cooldown_s"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the service refuses to start."""


@dataclass(frozen=True)
class TestAccount:
    """The documented test login that never sends an SMS."""

    country_code: str = "86"
    phone_number: str = "10086"
    verify_code: str = "1234"

    def matches(self, country_code: str, phone_number: str) -> bool:
        """Whether a phone is the test account's."""
        return country_code == self.country_code and phone_number == self.phone_number


@dataclass(frozen=True)
class Settings:
    """The whole configuration of both services; tests construct it directly."""

    # Which function these settings are for ("login", "chat", or "" for tools): checks are per service.
    service: str = ""
    env: str = "local"
    db_url: str | None = None
    db_connect_timeout_s: float = 5.0
    db_read_timeout_s: float = 10.0
    db_pool_size: int = 16
    db_tls: bool = False
    jwt_secret: str = field(default="", repr=False)
    jwt_ttl_s: int = 604_800
    cors_origins: tuple[str, ...] = ("*",)
    trust_proxy: bool = False
    # How many proxies in front append to X-Forwarded-For (FC's gateway: 1; a CDN or WAF in front adds one).
    trusted_proxy_hops: int = 1
    log_level: str = "INFO"
    timezone: str = "Asia/Shanghai"

    # LoginService
    login_body_limit: int = 64 * KIB
    test_account: TestAccount | None = field(default_factory=TestAccount)
    sms_provider: str = "console"
    sms_endpoint: str = DEFAULT_SMS_ENDPOINT
    sms_sign_name: str = ""
    sms_template_code: str = ""
    sms_connect_timeout_ms: int = 3000
    sms_read_timeout_ms: int = 5000
    alibaba_access_key_id: str = field(default="", repr=False)
    alibaba_access_key_secret: str = field(default="", repr=False)
    alibaba_security_token: str = field(default="", repr=False)
    code_ttl_s: int = 300
    code_resend_cooldown_s: int = 60
    code_max_per_phone_per_day: int = 10
    code_max_per_ip_per_day: int = 50
    code_max_attempts: int = 5
    # Refresh tokens (every login returns one) and failed password logins.
    refresh_ttl_s: int = 30 * 86_400
    password_fail_window_s: int = 900
    password_fail_per_account: int = 10
    password_fail_per_ip: int = 50

    # ChatService
    chat_body_limit: int = 16 * MIB
    llm_base_url: str = DEFAULT_LLM_BASE_URL
    llm_api_key: str = field(default="", repr=False)
    llm_model: str = "qwen-plus"
    llm_vision_model: str = "qwen-vl-plus"
    # The models a conversation may choose (AICHAT_LLM_MODELS); empty means just llm_model.
    llm_models: tuple[str, ...] = ()
    # Send DashScope's `enable_thinking` on every request (off for upstreams that refuse unknown fields).
    llm_thinking_flag: bool = True
    # /chat/continue sends the cut reply with DashScope's `partial: true` (off: as a prompt to go on).
    llm_partial_mode: bool = True
    llm_connect_timeout_s: float = 5.0
    llm_read_timeout_s: float = 60.0
    message_max_chars: int = 4000
    image_max_bytes: int = 10 * MIB
    # The context window the model gets: prompt + opening message + history + the new turn + the reply.
    context_tokens: int = 8000
    reply_reserve_tokens: int = 1024  # reserved for the reply when the request sets no max_tokens
    llm_include_usage: bool = True
    history_max_messages: int = 40
    roles_file: str = ""
    chat_messages_per_minute: int = 20
    chat_max_concurrent_streams: int = 2
    # A stream's slot is released when it ends; its lease, renewed while the stream runs, frees the slot of
    # an instance that died mid-stream within this many seconds.
    stream_lease_s: int = 30
    # The bounds of one reply: it ends as complete (finish_reason "length") past either.
    reply_max_chars: int = 20_000
    reply_max_seconds: float = 240.0  # below the chat function's timeout in s.yaml
    # How often a streaming reply is stored as it grows (what a dying instance leaves behind).
    reply_checkpoint_s: float = 2.0
    # How long a reply's final save is retried (an RDS failover takes ~30 s) before it is spooled.
    reply_save_window_s: float = 45.0
    spool_dir: str = "/tmp/aichat-spool"  # noqa: S108 - FC's instance-local disk; a setting
    # An SSE comment line is sent after this many seconds without a frame (idle-timeout middleboxes).
    sse_heartbeat_s: float = 15.0
    # The most a request (not a stream) waits on the database in all, over all its statements.
    db_request_budget_s: float = 10.0
    # Redis for the hot path (token liveness, chat limits and slots); empty: everything in the database.
    redis_url: str = field(default="", repr=False)
    redis_timeout_s: float = 0.25  # every Redis call's bound; past it the database answers
    redis_prefix: str = "aichat:"
    # How long an idempotency key of a send is remembered (a repeat within it is the first request's answer).
    idempotency_ttl_s: int = 86_400

    # Tools (role skills). A tool whose provider is not configured is not offered.
    tools_enabled: bool = True
    tool_timeout_s: float = 5.0  # each call's own bound (provider connect + read within it)
    tool_max_rounds: int = 4  # rounds with tool calls in one reply; the next round answers without tools
    tool_output_max_chars: int = 4000  # what the model reads of one result
    tool_execute_per_minute: int = 20  # POST /chat/tool/execute per user
    weather_provider: str = "amap"
    amap_base_url: str = "https://restapi.amap.com"
    amap_key: str = field(default="", repr=False)
    qweather_base_url: str = ""  # every QWeather developer has an API host of their own
    qweather_key: str = field(default="", repr=False)
    news_sources: tuple[str, ...] = ("baidu", "toutiao")
    baidu_base_url: str = "https://top.baidu.com"
    toutiao_base_url: str = "https://www.toutiao.com"
    news_cache_s: float = 600.0
    # Send DashScope's `enable_search` for roles with the web_search skill (off for other upstreams).
    llm_search_flag: bool = True
    search_strategy: str = "turbo"

    # Voice (GET /chat/voice): DashScope text-to-speech with the model's API key, cached in a store.
    dashscope_base_url: str = DEFAULT_DASHSCOPE_BASE_URL
    tts_provider: str = "qwen"  # qwen (Qwen-TTS) or cosyvoice
    tts_model: str = ""  # empty: qwen3-tts-flash / cosyvoice-v3-flash
    tts_default_voice: str = ""  # for roles without a voice; empty: Cherry / longanyang
    tts_connect_timeout_s: float = 5.0
    tts_read_timeout_s: float = 30.0
    tts_parallel: int = 3  # pieces of one long reply synthesised at once
    voice_per_minute: int = 10
    voice_chars_per_day: int = 20_000
    audio_store: str = "local"  # local (a directory) or oss
    audio_dir: str = "/tmp/aichat-audio"  # noqa: S108 - a setting; make run puts it in the data folder
    oss_endpoint: str = ""  # e.g. https://oss-cn-hangzhou-internal.aliyuncs.com (in-region, internal)
    oss_bucket: str = ""
    oss_region: str = ""  # e.g. cn-hangzhou (the V4 signature's scope)
    oss_prefix: str = "voice/"
    oss_url_ttl_s: int = 300  # signed URLs live this long (well within the role's credentials)

    def __post_init__(self) -> None:
        if not self.llm_models:
            object.__setattr__(self, "llm_models", (self.llm_model,))
        self.validate()

    @property
    def is_production(self) -> bool:
        """Whether the strict production rules apply."""
        return self.env == "production"

    @property
    def code_secret(self) -> bytes:
        """The HMAC key for verification codes, derived so it never equals the JWT key itself."""
        import hashlib
        import hmac

        return hmac.new(self.jwt_secret.encode(), b"aichat/verification-code", hashlib.sha256).digest()

    @cached_property
    def tz(self) -> ZoneInfo:
        """The time zone history timestamps are shown in."""
        return ZoneInfo(self.timezone)

    def validate(self) -> None:
        """Refuse settings the services cannot run with (the rules: config_rules.py)."""
        from .config_rules import check

        check(self)


def env_name(field_name: str) -> str:
    """The environment variable that sets a Settings field (for error messages)."""
    return next((var for var, (name, _) in ENV_VARS.items() if name == field_name), field_name)


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def _test_account(value: str) -> TestAccount | None:
    """Parse AICHAT_TEST_ACCOUNT: on (the documented 86/10086/1234), off, or country:phone:code."""
    text = value.strip().lower()
    if text in ("", "on", "true", "1"):
        return TestAccount()
    if text in ("off", "false", "0"):
        return None
    parts = value.strip().split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError("AICHAT_TEST_ACCOUNT must be on, off or <country>:<phone>:<code>")
    return TestAccount(*parts)


# env var -> (Settings field, parser). The single list of names the code reads; template/env.example
# documents each one and a test keeps the two in step.
ENV_VARS: dict[str, tuple[str, object]] = {
    "AICHAT_ENV": ("env", str),
    "AICHAT_DB_URL": ("db_url", str),
    "AICHAT_DB_CONNECT_TIMEOUT": ("db_connect_timeout_s", float),
    "AICHAT_DB_READ_TIMEOUT": ("db_read_timeout_s", float),
    "AICHAT_DB_POOL_SIZE": ("db_pool_size", int),
    "AICHAT_DB_TLS": ("db_tls", _flag),
    "AICHAT_JWT_SECRET": ("jwt_secret", str),
    "AICHAT_JWT_TTL": ("jwt_ttl_s", int),
    "AICHAT_CORS_ORIGINS": ("cors_origins", lambda v: tuple(o.strip() for o in v.split(",") if o.strip())),
    "AICHAT_TRUST_PROXY": ("trust_proxy", _flag),
    "AICHAT_TRUSTED_PROXY_HOPS": ("trusted_proxy_hops", int),
    "AICHAT_LOG_LEVEL": ("log_level", str.upper),
    "AICHAT_TIMEZONE": ("timezone", str),
    "AICHAT_LOGIN_BODY_LIMIT": ("login_body_limit", int),
    "AICHAT_TEST_ACCOUNT": ("test_account", _test_account),
    "AICHAT_SMS_PROVIDER": ("sms_provider", str.lower),
    "AICHAT_SMS_ENDPOINT": ("sms_endpoint", str),
    "AICHAT_SMS_SIGN_NAME": ("sms_sign_name", str),
    "AICHAT_SMS_TEMPLATE_CODE": ("sms_template_code", str),
    "AICHAT_SMS_CONNECT_TIMEOUT_MS": ("sms_connect_timeout_ms", int),
    "AICHAT_SMS_READ_TIMEOUT_MS": ("sms_read_timeout_ms", int),
    "ALIBABA_CLOUD_ACCESS_KEY_ID": ("alibaba_access_key_id", str),
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": ("alibaba_access_key_secret", str),
    "ALIBABA_CLOUD_SECURITY_TOKEN": ("alibaba_security_token", str),
    "AICHAT_CODE_TTL": ("code_ttl_s", int),
    "AICHAT_CODE_RESEND_COOLDOWN": ("code_resend_cooldown_s", int),
    "AICHAT_CODE_MAX_PER_PHONE_PER_DAY": ("code_max_per_phone_per_day", int),
    "AICHAT_CODE_MAX_PER_IP_PER_DAY": ("code_max_per_ip_per_day", int),
    "AICHAT_CODE_MAX_ATTEMPTS": ("code_max_attempts", int),
    "AICHAT_REFRESH_TTL": ("refresh_ttl_s", int),
    "AICHAT_PASSWORD_FAIL_WINDOW": ("password_fail_window_s", int),
    "AICHAT_PASSWORD_FAIL_PER_ACCOUNT": ("password_fail_per_account", int),
    "AICHAT_PASSWORD_FAIL_PER_IP": ("password_fail_per_ip", int),
    "AICHAT_CHAT_BODY_LIMIT": ("chat_body_limit", int),
    "AICHAT_LLM_BASE_URL": ("llm_base_url", lambda v: v.rstrip("/")),
    "AICHAT_LLM_API_KEY": ("llm_api_key", str),
    "AICHAT_LLM_MODEL": ("llm_model", str),
    "AICHAT_LLM_VISION_MODEL": ("llm_vision_model", str),
    "AICHAT_LLM_MODELS": ("llm_models", lambda v: tuple(m.strip() for m in v.split(",") if m.strip())),
    "AICHAT_LLM_THINKING_FLAG": ("llm_thinking_flag", _flag),
    "AICHAT_LLM_PARTIAL_MODE": ("llm_partial_mode", _flag),
    "AICHAT_LLM_CONNECT_TIMEOUT": ("llm_connect_timeout_s", float),
    "AICHAT_LLM_READ_TIMEOUT": ("llm_read_timeout_s", float),
    "AICHAT_MESSAGE_MAX_CHARS": ("message_max_chars", int),
    "AICHAT_IMAGE_MAX_BYTES": ("image_max_bytes", int),
    "AICHAT_CONTEXT_TOKENS": ("context_tokens", int),
    "AICHAT_REPLY_RESERVE_TOKENS": ("reply_reserve_tokens", int),
    "AICHAT_LLM_INCLUDE_USAGE": ("llm_include_usage", _flag),
    "AICHAT_HISTORY_MAX_MESSAGES": ("history_max_messages", int),
    "AICHAT_ROLES_FILE": ("roles_file", str),
    "AICHAT_CHAT_MESSAGES_PER_MINUTE": ("chat_messages_per_minute", int),
    "AICHAT_CHAT_MAX_CONCURRENT_STREAMS": ("chat_max_concurrent_streams", int),
    "AICHAT_STREAM_LEASE": ("stream_lease_s", int),
    "AICHAT_REPLY_MAX_CHARS": ("reply_max_chars", int),
    "AICHAT_REPLY_MAX_SECONDS": ("reply_max_seconds", float),
    "AICHAT_REPLY_CHECKPOINT": ("reply_checkpoint_s", float),
    "AICHAT_REPLY_SAVE_WINDOW": ("reply_save_window_s", float),
    "AICHAT_SPOOL_DIR": ("spool_dir", str),
    "AICHAT_SSE_HEARTBEAT": ("sse_heartbeat_s", float),
    "AICHAT_DB_REQUEST_BUDGET": ("db_request_budget_s", float),
    "AICHAT_IDEMPOTENCY_TTL": ("idempotency_ttl_s", int),
    "AICHAT_REDIS_URL": ("redis_url", str),
    "AICHAT_REDIS_TIMEOUT": ("redis_timeout_s", float),
    "AICHAT_REDIS_PREFIX": ("redis_prefix", str),
    "AICHAT_TOOLS": ("tools_enabled", _flag),
    "AICHAT_TOOL_TIMEOUT": ("tool_timeout_s", float),
    "AICHAT_TOOL_MAX_ROUNDS": ("tool_max_rounds", int),
    "AICHAT_TOOL_OUTPUT_MAX_CHARS": ("tool_output_max_chars", int),
    "AICHAT_TOOL_EXECUTE_PER_MINUTE": ("tool_execute_per_minute", int),
    "AICHAT_WEATHER_PROVIDER": ("weather_provider", str.lower),
    "AICHAT_AMAP_BASE_URL": ("amap_base_url", lambda v: v.rstrip("/")),
    "AICHAT_AMAP_KEY": ("amap_key", str),
    "AICHAT_QWEATHER_BASE_URL": ("qweather_base_url", lambda v: v.rstrip("/")),
    "AICHAT_QWEATHER_KEY": ("qweather_key", str),
    "AICHAT_NEWS_SOURCES": ("news_sources", lambda v: tuple(s.strip().lower() for s in v.split(",") if s.strip())),
    "AICHAT_BAIDU_BASE_URL": ("baidu_base_url", lambda v: v.rstrip("/")),
    "AICHAT_TOUTIAO_BASE_URL": ("toutiao_base_url", lambda v: v.rstrip("/")),
    "AICHAT_NEWS_CACHE": ("news_cache_s", float),
    "AICHAT_LLM_SEARCH_FLAG": ("llm_search_flag", _flag),
    "AICHAT_SEARCH_STRATEGY": ("search_strategy", str),
    "AICHAT_DASHSCOPE_BASE_URL": ("dashscope_base_url", lambda v: v.rstrip("/")),
    "AICHAT_TTS_PROVIDER": ("tts_provider", str.lower),
    "AICHAT_TTS_MODEL": ("tts_model", str),
    "AICHAT_TTS_DEFAULT_VOICE": ("tts_default_voice", str),
    "AICHAT_TTS_CONNECT_TIMEOUT": ("tts_connect_timeout_s", float),
    "AICHAT_TTS_TIMEOUT": ("tts_read_timeout_s", float),
    "AICHAT_TTS_PARALLEL": ("tts_parallel", int),
    "AICHAT_VOICE_PER_MINUTE": ("voice_per_minute", int),
    "AICHAT_VOICE_CHARS_PER_DAY": ("voice_chars_per_day", int),
    "AICHAT_AUDIO_STORE": ("audio_store", str.lower),
    "AICHAT_AUDIO_DIR": ("audio_dir", str),
    "AICHAT_OSS_ENDPOINT": ("oss_endpoint", lambda v: v.rstrip("/")),
    "AICHAT_OSS_BUCKET": ("oss_bucket", str),
    "AICHAT_OSS_REGION": ("oss_region", str),
    "AICHAT_OSS_PREFIX": ("oss_prefix", str),
    "AICHAT_OSS_URL_TTL": ("oss_url_ttl_s", int),
}

# Read by the process runner (gunicorn config / make run), not by Settings.
RUNNER_ENV_VARS = (
    "AICHAT_BIND",
    "FC_SERVER_PORT",
    "AICHAT_WORKERS",
    "AICHAT_THREADS",
    "AICHAT_HEADER_TIMEOUT",
    "AICHAT_LOGIN_PORT",
    "AICHAT_CHAT_PORT",
    "AICHAT_WEB_PORT",
    "AICHAT_DATA_DIR",
)
# Accepted as the upstream key when AICHAT_LLM_API_KEY is unset (DashScope's own name).
FALLBACK_KEY_VAR = "DASHSCOPE_API_KEY"


def load_settings(environ: Mapping[str, str] | None = None, *, service: str = "") -> Settings:
    """Build one service's Settings from environment variables, raising ConfigError on anything invalid."""
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(Settings)}
    values: dict[str, object] = {}
    for var, (name, parse) in ENV_VARS.items():
        raw = environ.get(var)
        if raw is None or (raw == "" and name not in ("test_account", "news_sources")):
            continue
        assert name in known
        try:
            values[name] = parse(raw)  # type: ignore[operator]
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{var} is not valid: {raw!r}") from exc
    if "llm_api_key" not in values and environ.get(FALLBACK_KEY_VAR):
        values["llm_api_key"] = environ[FALLBACK_KEY_VAR]
    return Settings(service=service, **values)  # type: ignore[arg-type]
