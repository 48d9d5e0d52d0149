"""LoginService abuse controls (a documented extension), configuration refusals and database failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import dysms_env
from tests.helpers import ROOT, Client, assert_error, base_env, random_ip, random_phone

# Token liveness, limits and throttles: these tests run a third time with Redis holding that state.
pytestmark = pytest.mark.redis_state


def test_resend_cooldown(login):
    phone = random_phone()
    assert login.post("/send_code", {"phone_number": phone}).status_code == 200
    res = login.post("/send_code", {"phone_number": phone})
    body = assert_error(res, 429, "RateLimited")
    assert 55 <= int(res.headers["Retry-After"]) <= 60
    assert body["message"]
    # Another caller (another IP) hits the same per-phone cooldown.
    other = Client(login.base_url)
    assert_error(other.post("/send_code", {"phone_number": phone}), 429, "RateLimited")


def test_cooldown_is_shared_by_instances(start_server, db_url, fake_dysms, login_server):
    # A second server process on the same database sees the first one's cooldown.
    second = start_server("login", AICHAT_DB_URL=db_url, **dysms_env(fake_dysms))
    phone = random_phone()
    assert Client(login_server.base_url).post("/send_code", {"phone_number": phone}).status_code == 200
    assert_error(Client(second.base_url).post("/send_code", {"phone_number": phone}), 429, "RateLimited")


@pytest.fixture
def strict_login(start_server, db_url, fake_dysms):
    """LoginService with tiny limits and no cooldown, so caps are reached quickly."""
    server = start_server(
        "login",
        AICHAT_DB_URL=db_url,
        AICHAT_CODE_RESEND_COOLDOWN=0,
        AICHAT_CODE_MAX_PER_PHONE_PER_DAY=2,
        AICHAT_CODE_MAX_PER_IP_PER_DAY=3,
        **dysms_env(fake_dysms),
    )
    return server


def test_per_phone_daily_cap(strict_login):
    phone = random_phone()
    for _ in range(2):
        assert Client(strict_login.base_url).post("/send_code", {"phone_number": phone}).status_code == 200
    res = Client(strict_login.base_url).post("/send_code", {"phone_number": phone})
    assert_error(res, 429, "RateLimited")
    assert 86_000 <= int(res.headers["Retry-After"]) <= 86_400


def test_per_ip_daily_cap(strict_login):
    client = Client(strict_login.base_url)
    for _ in range(3):
        assert client.post("/send_code", {"phone_number": random_phone()}).status_code == 200
    assert_error(client.post("/send_code", {"phone_number": random_phone()}), 429, "RateLimited")
    # The body's source_ip is recorded but never trusted for limits.
    res = client.post("/send_code", {"phone_number": random_phone(), "source_ip": random_ip()})
    assert_error(res, 429, "RateLimited")
    # The test account stays exempt.
    assert client.post("/send_code", {"phone_number": "10086"}).status_code == 200


def test_without_trusted_proxy_the_peer_address_counts(start_server, sqlite_url, fake_dysms):
    server = start_server(
        "login",
        AICHAT_DB_URL=sqlite_url,
        AICHAT_TRUST_PROXY="0",
        AICHAT_CODE_RESEND_COOLDOWN=0,
        AICHAT_CODE_MAX_PER_IP_PER_DAY=2,
        **dysms_env(fake_dysms),
    )
    # Each request claims another X-Forwarded-For address, but the socket peer is 127.0.0.1 every time.
    for _ in range(2):
        assert Client(server.base_url).post("/send_code", {"phone_number": random_phone()}).status_code == 200
    assert_error(Client(server.base_url).post("/send_code", {"phone_number": random_phone()}), 429, "RateLimited")


def test_database_down_answers_database_error(start_server, fake_dysms):
    # Nothing listens on port 9 (discard): connecting fails at once.
    server = start_server("login", AICHAT_DB_URL="mysql://root@127.0.0.1:9/none", AICHAT_DB_CONNECT_TIMEOUT=2)
    client = Client(server.base_url)
    assert client.get("/health").status_code == 200
    res = client.post("/send_code", {"phone_number": random_phone()})
    assert_error(res, 500, "DatabaseError")
    assert res.elapsed.total_seconds() < 5
    assert_error(client.post("/login", {"phone_number": "10086", "verify_code": "1234"}), 500, "DatabaseError")
    assert "Traceback" not in res.text


def test_missing_database_config(start_server):
    server = start_server("login", AICHAT_DB_URL=None)
    client = Client(server.base_url)
    assert client.get("/health").status_code == 200
    assert_error(client.post("/login", {"phone_number": "10086", "verify_code": "1234"}), 500, "MissingDatabaseConfig")


def _import_login_app(**env: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import app"],
        cwd=ROOT / "functions" / "login",
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"AICHAT_JWT_SECRET": None}, "AICHAT_JWT_SECRET"),
        ({"AICHAT_JWT_SECRET": "short-secret"}, "at least 32 bytes"),
        ({"AICHAT_SMS_PROVIDER": "console"}, "console SMS provider"),
        ({"AICHAT_SMS_SIGN_NAME": None}, "AICHAT_SMS_SIGN_NAME"),
        ({"AICHAT_ENV": "staging"}, "AICHAT_ENV"),
    ],
)
def test_production_refuses_to_start(overrides, reason):
    env = {
        "AICHAT_ENV": "production",
        "AICHAT_DB_URL": "sqlite:///:memory:",
        "AICHAT_SMS_PROVIDER": "dysms",
        "AICHAT_SMS_SIGN_NAME": "sign",
        "AICHAT_SMS_TEMPLATE_CODE": "SMS_1",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "id",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "secret",
        **overrides,
    }
    result = _import_login_app(**env)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and reason in result.stderr


def test_production_starts_with_good_settings():
    result = _import_login_app(
        AICHAT_ENV="production",
        AICHAT_DB_URL="sqlite:///:memory:",
        AICHAT_SMS_PROVIDER="dysms",
        AICHAT_SMS_SIGN_NAME="sign",
        AICHAT_SMS_TEMPLATE_CODE="SMS_1",
        ALIBABA_CLOUD_ACCESS_KEY_ID="id",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="secret",
    )
    assert result.returncode == 0, result.stderr
