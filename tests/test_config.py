"""Settings parsing, the operator templates kept in step with the code, and the management command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aichat import config
from aichat.config import ENV_VARS, FALLBACK_KEY_VAR, RUNNER_ENV_VARS, ConfigError, load_settings
from aichat.store import ddl
from aichat.store.schema import MIGRATIONS

from tests.helpers import LAYER, ROOT

BASE = {"AICHAT_JWT_SECRET": "s" * 40}


def test_defaults():
    settings = load_settings(BASE)
    assert settings.env == "local" and settings.jwt_ttl_s == 604800
    assert settings.test_account == config.TestAccount("86", "10086", "1234")
    assert settings.cors_origins == ("*",) and settings.trust_proxy is False
    assert settings.login_body_limit == 64 * 1024


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"AICHAT_TEST_ACCOUNT": "off"}, "test_account", None),
        ({"AICHAT_TEST_ACCOUNT": "852:91234567:8888"}, "test_account", config.TestAccount("852", "91234567", "8888")),
        ({"AICHAT_TRUST_PROXY": "yes"}, "trust_proxy", True),
        (
            {"AICHAT_CORS_ORIGINS": "https://a.example, https://b.example"},
            "cors_origins",
            ("https://a.example", "https://b.example"),
        ),
        ({"AICHAT_LLM_BASE_URL": "http://x/v1/"}, "llm_base_url", "http://x/v1"),
        ({FALLBACK_KEY_VAR: "dk"}, "llm_api_key", "dk"),
        ({FALLBACK_KEY_VAR: "dk", "AICHAT_LLM_API_KEY": "ak"}, "llm_api_key", "ak"),
    ],
)
def test_parsing(env, field, expected):
    assert getattr(load_settings({**BASE, **env}), field) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"AICHAT_JWT_SECRET": ""},
        {"AICHAT_CODE_TTL": "soon"},
        {"AICHAT_CODE_TTL": "0"},
        {"AICHAT_TRUST_PROXY": "maybe"},
        {"AICHAT_TEST_ACCOUNT": "10086"},
        {"AICHAT_DB_URL": "postgres://x"},
        {"AICHAT_TIMEZONE": "Mars/Olympus"},
        {"AICHAT_SMS_PROVIDER": "pigeon"},
    ],
)
def test_invalid_settings_are_refused(env):
    with pytest.raises(ConfigError):
        load_settings({**BASE, **env})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("AICHAT_LOG_LEVEL", "VERBOSE"),
        ("AICHAT_DB_READ_TIMEOUT", "0"),
        ("AICHAT_DB_CONNECT_TIMEOUT", "-1"),
        ("AICHAT_LLM_READ_TIMEOUT", "0"),
        ("AICHAT_SMS_READ_TIMEOUT_MS", "0"),
        ("AICHAT_CHAT_MESSAGES_PER_MINUTE", "0"),
        ("AICHAT_CHAT_MAX_CONCURRENT_STREAMS", "0"),
        ("AICHAT_CODE_MAX_PER_IP_PER_DAY", "0"),
        ("AICHAT_CODE_RESEND_COOLDOWN", "-5"),
        ("AICHAT_REPLY_MAX_SECONDS", "0"),
        ("AICHAT_DB_REQUEST_BUDGET", "-1"),
        ("AICHAT_CORS_ORIGINS", "https://app.example/"),
        ("AICHAT_CORS_ORIGINS", "app.example"),
        ("AICHAT_LLM_MODELS", "qwen-max"),  # must include AICHAT_LLM_MODEL
    ],
)
def test_settings_it_cannot_run_with_are_refused_by_name(var, value):
    with pytest.raises(ConfigError, match=var):
        load_settings({**BASE, var: value})


def test_an_enabled_flag_must_be_a_boolean(tmp_path):
    from aichat.chat.roles import read_roles_file

    roles = json.loads((ROOT / "template" / "roles.json").read_text(encoding="utf-8"))
    roles["roles"][0]["enabled"] = "false"  # would count as enabled if taken as truthy
    path = tmp_path / "roles.json"
    path.write_text(json.dumps(roles, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="enabled"):
        read_roles_file(path)
    # And a service given it refuses to start, naming the variable.
    from aichat.chat.roles import RoleCatalog
    from aichat.store import UnconfiguredDatabase

    with pytest.raises(ConfigError, match="AICHAT_ROLES_FILE"):
        RoleCatalog(UnconfiguredDatabase(), roles_file=str(path))


def test_secrets_stay_out_of_repr():
    settings = load_settings({**BASE, "AICHAT_LLM_API_KEY": "sk-secret-value"})
    assert "sk-secret-value" not in repr(settings) and "s" * 40 not in repr(settings)


def test_env_example_documents_every_variable():
    text = (ROOT / "template" / "env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert documented == set(ENV_VARS) | set(RUNNER_ENV_VARS) - {"FC_SERVER_PORT"}


@pytest.mark.parametrize("dialect", ["sqlite", "mysql"])
def test_schema_templates_match_the_migrations(dialect):
    committed = (ROOT / "template" / f"schema.{dialect}.sql").read_text(encoding="utf-8")
    assert committed == ddl(dialect), "run `make schema`"


def test_manage_migrate_and_load_roles(tmp_path):
    env = {"AICHAT_JWT_SECRET": "s" * 40, "AICHAT_DB_URL": f"sqlite:///{tmp_path / 'a.db'}", "PYTHONPATH": str(LAYER)}
    run = [sys.executable, "-m", "aichat.manage"]
    first = subprocess.run([*run, "migrate"], env=env, capture_output=True, text=True, check=True)
    assert f"applied {[m[0] for m in MIGRATIONS]}" in first.stdout
    again = subprocess.run([*run, "migrate"], env=env, capture_output=True, text=True, check=True)
    assert "nothing" in again.stdout
    roles = subprocess.run(
        [*run, "load-roles", str(ROOT / "template" / "roles.json")], env=env, capture_output=True, text=True, check=True
    )
    assert "naitang" in roles.stdout and "wanqing" in roles.stdout
    assert Path(tmp_path / "a.db").exists()
