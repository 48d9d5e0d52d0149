"""The SMS limits with Redis (AICHAT_REDIS_URL): the resend cooldown, the daily caps and each code's wrong
guesses live there, across login instances; the codes stay in the database; Redis away or hanging, the
database's limits hold on their own (including what was claimed in Redis before it went)."""

from __future__ import annotations

import sqlite3

import pytest

from tests.conftest import dysms_env
from tests.helpers import (
    TEST_SECRET,
    Client,
    assert_error,
    free_port,
    query,
    random_ip,
    random_phone,
    send_and_read_code,
)


@pytest.fixture(scope="session")
def sms_env(db_url, fake_dysms, redis_url) -> dict[str, object]:
    return {"AICHAT_DB_URL": db_url, "AICHAT_REDIS_URL": redis_url, **dysms_env(fake_dysms)}


def test_the_cooldown_and_caps_live_in_redis_across_instances(start_server, sms_env, fake_dysms, rdb, db_url):
    one, two = start_server("login", **sms_env), start_server("login", **sms_env)
    phone, caller = random_phone(), Client(one.base_url)
    code = send_and_read_code(caller, fake_dysms, phone)
    res = Client(two.base_url).post("/send_code", {"phone_number": phone})  # another instance, another IP
    assert_error(res, 429, "RateLimited")
    assert 55 <= int(res.headers["Retry-After"]) <= 60
    assert 55_000 < rdb.pttl(f"aichat:sms:cooldown:86:{phone}") <= 60_000  # every key expires by itself
    assert rdb.zcard(f"aichat:sms:phone:86:{phone}") == 1 and rdb.pttl(f"aichat:sms:phone:86:{phone}") > 0
    assert rdb.zcard(f"aichat:sms:ip:{caller.ip}") == 1
    assert query(db_url, "SELECT COUNT(*) FROM send_cooldowns WHERE phone_key = ?", (f"86:{phone}",)) == [(0,)]
    # The code itself is in the database, and logs in on the other instance.
    assert query(db_url, "SELECT status FROM verification_codes WHERE phone_number = ?", (phone,)) == [("live",)]
    assert Client(two.base_url).post("/login", {"phone_number": phone, "verify_code": code}).status_code == 200


def test_caps_in_redis_answer_how_long_they_last(start_server, sms_env):
    server = start_server(
        "login",
        **sms_env,
        AICHAT_CODE_RESEND_COOLDOWN=0,
        AICHAT_CODE_MAX_PER_PHONE_PER_DAY=2,
        AICHAT_CODE_MAX_PER_IP_PER_DAY=3,
    )
    phone = random_phone()
    for _ in range(2):
        assert Client(server.base_url).post("/send_code", {"phone_number": phone}).status_code == 200
    res = Client(server.base_url).post("/send_code", {"phone_number": phone})
    assert assert_error(res, 429, "RateLimited")["message"] == "该手机号今日验证码发送次数已达上限"
    assert 86_000 <= int(res.headers["Retry-After"]) <= 86_400
    caller = Client(server.base_url)
    for _ in range(3):
        assert caller.post("/send_code", {"phone_number": random_phone()}).status_code == 200
    res = caller.post("/send_code", {"phone_number": random_phone()})
    assert assert_error(res, 429, "RateLimited")["message"] == "当前网络今日验证码请求次数已达上限"


def test_a_failed_send_gives_its_cooldown_and_phone_cap_back(start_server, sms_env, fake_dysms, rdb):
    server = start_server("login", **sms_env, AICHAT_CODE_MAX_PER_PHONE_PER_DAY=1)
    phone, caller = random_phone(), Client(server.base_url)
    fake_dysms.script(phone, "http_500")
    assert_error(caller.post("/send_code", {"phone_number": phone}), 500, "SendCodeFailed")
    assert not rdb.exists(f"aichat:sms:cooldown:86:{phone}")
    assert rdb.zcard(f"aichat:sms:phone:86:{phone}") == 0
    assert rdb.zcard(f"aichat:sms:ip:{caller.ip}") == 1  # the caller's IP keeps it (as the database's cap does)
    fake_dysms.script(phone, "ok")
    send_and_read_code(caller, fake_dysms, phone)


def test_wrong_guesses_are_counted_in_redis_and_burn_the_code(start_server, sms_env, fake_dysms, rdb, db_url):
    server = start_server("login", **sms_env, AICHAT_CODE_MAX_ATTEMPTS=3)
    phone = random_phone()
    code = send_and_read_code(Client(server.base_url), fake_dysms, phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(3):
        res = Client(server.base_url).post("/login", {"phone_number": phone, "verify_code": wrong})
        assert_error(res, 401, "VerifyFailed")
    ((code_id, status, attempts),) = query(
        db_url, "SELECT id, status, attempts FROM verification_codes WHERE phone_number = ?", (phone,)
    )
    assert (status, attempts) == ("burned", 0)  # burned in the database too; the guesses were counted in Redis
    key = f"aichat:sms:guesses:86:{phone}:{code_id}"
    assert rdb.get(key) == "3" and 0 < rdb.pttl(key) <= 300_000
    res = Client(server.base_url).post("/login", {"phone_number": phone, "verify_code": code})
    assert_error(res, 401, "VerifyFailed")  # the right code, too late


def test_guesses_made_in_both_places_add_up(start_server, sms_env, fake_dysms, db_url):
    # Two guesses while Redis is away (counted in the row), then one with it: the limit of 3 is reached.
    env = {**sms_env, "AICHAT_CODE_MAX_ATTEMPTS": 3}
    with_redis = start_server("login", **env)
    without = start_server("login", **{**env, "AICHAT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    phone = random_phone()
    code = send_and_read_code(Client(with_redis.base_url), fake_dysms, phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for server in (without, without, with_redis):
        assert_error(
            Client(server.base_url).post("/login", {"phone_number": phone, "verify_code": wrong}), 401, "VerifyFailed"
        )
    assert query(db_url, "SELECT status, attempts FROM verification_codes WHERE phone_number = ?", (phone,)) == [
        ("burned", 2)
    ]
    res = Client(with_redis.base_url).post("/login", {"phone_number": phone, "verify_code": code})
    assert_error(res, 401, "VerifyFailed")


def test_redis_away_the_database_limits_hold_including_what_redis_claimed(start_server, sms_env, fake_dysms, db_url):
    # Redis refuses connections: the database serves the limits (never a 500, never a hang) ...
    away = start_server("login", **{**sms_env, "AICHAT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    phone = random_phone()
    code = send_and_read_code(Client(away.base_url), fake_dysms, phone)
    res = Client(away.base_url).post("/send_code", {"phone_number": phone})
    assert_error(res, 429, "RateLimited")
    assert 55 <= int(res.headers["Retry-After"]) <= 60
    assert Client(away.base_url).post("/login", {"phone_number": phone, "verify_code": code}).status_code == 200
    # ... and a cooldown claimed in Redis holds there too: the phone's newest sent code says so.
    up = start_server("login", **sms_env)
    other = random_phone()
    send_and_read_code(Client(up.base_url), fake_dysms, other)
    res = Client(away.base_url).post("/send_code", {"phone_number": other})
    assert_error(res, 429, "RateLimited")
    assert 55 <= int(res.headers["Retry-After"]) <= 60


def test_a_send_the_database_would_not_store_gives_its_claim_back(login_module, tmp_path, redis_url, rdb):
    from aichat.config import Settings

    url = f"sqlite:///{tmp_path / 'aichat.db'}"
    settings = Settings(
        service="login", env="test", jwt_secret=TEST_SECRET, db_url=url, redis_url=redis_url, trust_proxy=True
    )
    client = login_module.build_app(settings).test_client()
    ip = random_ip()
    first = client.post("/send_code", json={"phone_number": random_phone()}, headers={"X-Forwarded-For": ip})
    assert first.status_code == 200  # migrated and working
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        conn.execute("DROP TABLE verification_codes")  # now the code cannot be stored
    phone = random_phone()
    res = client.post("/send_code", json={"phone_number": phone}, headers={"X-Forwarded-For": ip})
    assert res.status_code == 500 and res.get_json()["code"] == "DatabaseError"
    assert not rdb.exists(f"aichat:sms:cooldown:86:{phone}")  # the phone may ask again at once
    assert rdb.zcard(f"aichat:sms:phone:86:{phone}") == 0
