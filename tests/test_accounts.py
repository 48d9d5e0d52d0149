"""Accounts beyond the SMS code: registration, password login, refresh tokens with rotation and reuse
detection, sessions and their revocation (seen by ChatService), the profile, throttling across instances."""

from __future__ import annotations

import secrets
import statistics
import time

import pytest

from tests.helpers import Client, assert_error, query

# Token liveness, limits and throttles: these tests run a third time with Redis holding that state.
pytestmark = pytest.mark.redis_state

PASSWORD = "晚风轻拂西湖-2026"


def uname() -> str:
    return "u_" + secrets.token_hex(5)


def register(login: Client, **fields) -> dict:
    body = {"username": uname(), "password": PASSWORD, **fields}
    res = login.post("/register", body)
    assert res.status_code == 200, res.text
    return {**res.json()["user"], "username": body["username"]}


def password_login(login: Client, account: str, password: str = PASSWORD, **extra):
    return login.post("/login/password", {"account": account, "password": password, **extra})


# -- registration ------------------------------------------------------------------------------------


def test_register_then_log_in_with_username_or_email(login, chat_server):
    email = f"{uname()}@Example.COM"
    user = register(login, email=email, nickname="小晚")
    assert user["email"].startswith(email[0]) and "***@" in user["email"] and user["nickname"] == "小晚"
    for account in (user["username"], user["username"].upper(), email.lower()):
        res = password_login(login, account)
        assert res.status_code == 200, res.text
        body = res.json()
        # Exactly the contract's /login shape, plus the refresh token.
        assert set(body) == {
            "success",
            "message",
            "token_type",
            "access_token",
            "expires_in",
            "user",
            "is_test_account",
            "refresh_token",
            "refresh_expires_in",
        }
        assert body["token_type"] == "Bearer" and body["is_test_account"] is False
        assert body["user"] == {"uid": user["uid"], "phone_number": "", "country_code": ""}
        assert body["refresh_expires_in"] == 30 * 86_400
        assert res.headers["Cache-Control"] == "no-store"
    # The token works at ChatService too.
    assert (
        Client(chat_server.base_url, token=body["access_token"])
        .get("/chat/history", params={"role_code": "naitang"})
        .status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "有 空格的名字"}, "username"),
        ({"username": "x" * 21}, "username"),
        ({"username": None}, "username"),
        ({"password": "short7!"}, "password"),
        ({"password": "p" * 129}, "password"),
        ({"password": "password123"}, "password"),
        ({"password": "qwertyuiop"}, "password"),
        ({"email": "not-an-address"}, "email"),
        ({"email": "a@b"}, "email"),
        ({"nickname": "x" * 33}, "nickname"),
    ],
)
def test_registration_rules_name_the_field(login, body, field):
    res = login.post("/register", {"username": uname(), "password": PASSWORD, **body})
    assert field in assert_error(res, 400, "InvalidInput")["message"]


def test_the_password_may_not_be_the_username(login):
    name = "Moonlight_2026"
    res = login.post("/register", {"username": name, "password": "moonlight_2026"})
    assert "password" in assert_error(res, 400, "InvalidInput")["message"]


def test_the_password_is_nfkc_normalised(login):
    user = register(login, password="ｆｕｌｌｗｉｄｔｈ＿ｐａｓｓ９")  # full-width forms
    assert password_login(login, user["username"], "fullwidth_pass9").status_code == 200


def test_usernames_and_emails_are_unique_case_insensitively(login):
    user = register(login, email=f"{uname()}@example.com")
    assert_error(
        login.post("/register", {"username": user["username"].upper(), "password": PASSWORD}), 409, "AccountExists"
    )
    email = f"{uname()}@example.com"
    register(login, email=email)
    assert_error(
        login.post("/register", {"username": uname(), "password": PASSWORD, "email": email.upper()}),
        409,
        "AccountExists",
    )


def test_the_hash_is_argon2id_with_owasps_parameters(login, db_url):
    user = register(login)
    (stored,) = query(db_url, "SELECT password_hash FROM users WHERE uid = ?", (user["uid"],))[0]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_an_old_hash_is_upgraded_at_login(login, db_url):
    from argon2 import PasswordHasher

    user = register(login)
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    execute(db_url, "UPDATE users SET password_hash = ? WHERE uid = ?", (weak, user["uid"]))
    assert password_login(login, user["username"]).status_code == 200
    (stored,) = query(db_url, "SELECT password_hash FROM users WHERE uid = ?", (user["uid"],))[0]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def execute(db_url: str, sql: str, params: tuple) -> None:
    """Write straight to the test database."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(db_url[len("sqlite:///") :])
        with conn:
            conn.execute(sql, params)
        conn.close()
        return
    from urllib.parse import urlsplit

    import pymysql

    parts = urlsplit(db_url)
    conn = pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/"),
        autocommit=True,
    )
    with conn.cursor() as cur:
        cur.execute(sql.replace("?", "%s"), params)
    conn.close()


def sms_login(login: Client, fake_dysms, phone: str) -> dict:
    """Log a phone in with the code the fake Dysmsapi received."""
    client = Client(login.base_url)
    assert client.post("/send_code", {"phone_number": phone}).status_code == 200
    res = client.post("/login", {"phone_number": phone, "verify_code": fake_dysms.last_code(phone)})
    assert res.status_code == 200, res.text
    return res.json()


# -- password login ---------------------------------------------------------------------------------


def test_wrong_account_or_password_is_one_answer_taking_the_same_time(login):
    user = register(login)
    unknown: list[float] = []
    wrong: list[float] = []
    for _ in range(5):
        for account, bucket, password in ((uname(), unknown, PASSWORD), (user["username"], wrong, "wrong-pass-123")):
            began = time.perf_counter()
            res = password_login(Client(login.base_url), account, password)
            bucket.append(time.perf_counter() - began)
            assert assert_error(res, 401, "InvalidCredentials")["message"] == "账号或密码错误"
    ratio = statistics.median(unknown) / statistics.median(wrong)
    print(
        f"unknown account {statistics.median(unknown) * 1000:.1f} ms, wrong password "
        f"{statistics.median(wrong) * 1000:.1f} ms, ratio {ratio:.2f}"
    )
    assert 0.33 < ratio < 3  # the same order of magnitude: both verify one argon2id hash


def test_a_phone_account_adds_a_password_and_logs_in_with_its_number(login, fake_dysms):
    from tests.helpers import random_phone

    phone = random_phone()
    body = sms_login(login, fake_dysms, phone)
    assert body["refresh_token"] and body["refresh_expires_in"] == 30 * 86_400  # an SMS login gets one too
    me = Client(login.base_url, token=body["access_token"])
    profile = me.get("/me").json()["user"]
    assert profile["has_password"] is False and profile["username"] is None
    assert_error(password_login(login, phone), 401, "InvalidCredentials")  # no password yet
    res = me.post("/password/set", {"new_password": PASSWORD})
    assert res.status_code == 200 and res.json()["message"] == "密码已设置"
    logged = password_login(login, phone)
    assert logged.status_code == 200 and logged.json()["user"]["phone_number"] == phone
    assert password_login(login, "+86" + phone).status_code == 200
    assert me.get("/me").json()["user"]["has_password"] is True
    assert me.get("/me").status_code == 200  # adding a password ended no session


def test_changing_a_password_needs_the_current_one_and_ends_other_sessions(login, chat_server):
    user = register(login)
    first = password_login(login, user["username"]).json()
    second = password_login(login, user["username"]).json()
    here = Client(login.base_url, token=first["access_token"])
    assert_error(here.post("/password/set", {"new_password": "another-Secret-42"}), 400, "InvalidInput")
    assert_error(
        here.post("/password/set", {"new_password": "another-Secret-42", "current_password": "nope-nope"}),
        401,
        "InvalidCredentials",
    )
    res = here.post("/password/set", {"new_password": "another-Secret-42", "current_password": PASSWORD})
    assert res.status_code == 200 and res.json()["ended_sessions"] == 1
    assert here.get("/me").status_code == 200  # this session goes on
    other = Client(chat_server.base_url, token=second["access_token"])
    assert_error(other.get("/chat/history", params={"role_code": "naitang"}), 401, "Unauthorized")
    assert_error(login.post("/token/refresh", {"refresh_token": second["refresh_token"]}), 401, "Unauthorized")
    assert_error(password_login(login, user["username"]), 401, "InvalidCredentials")
    assert password_login(login, user["username"], "another-Secret-42").status_code == 200


# -- refresh tokens -----------------------------------------------------------------------------------


def test_refresh_rotates_and_a_reused_token_ends_the_session(login, chat_server, db_url):
    user = register(login)
    first = password_login(login, user["username"]).json()
    res = login.post("/token/refresh", {"refresh_token": first["refresh_token"]})
    assert res.status_code == 200, res.text
    second = res.json()
    assert second["refresh_token"] != first["refresh_token"] and second["access_token"] != first["access_token"]
    assert second["expires_in"] > 0 and second["token_type"] == "Bearer"
    chat = Client(chat_server.base_url, token=second["access_token"])
    assert chat.get("/chat/history", params={"role_code": "naitang"}).status_code == 200
    # The spent token comes back (a thief's copy): the whole family ends, the new tokens with it.
    assert_error(login.post("/token/refresh", {"refresh_token": first["refresh_token"]}), 401, "Unauthorized")
    assert_error(login.post("/token/refresh", {"refresh_token": second["refresh_token"]}), 401, "Unauthorized")
    assert_error(chat.get("/chat/history", params={"role_code": "naitang"}), 401, "Unauthorized")
    stored = query(db_url, "SELECT token_hash FROM refresh_tokens WHERE uid = ?", (user["uid"],))
    assert all(first["refresh_token"] not in row[0] for row in stored)  # only hashes are kept
    assert_error(login.post("/token/refresh", {"refresh_token": "made-up"}), 401, "Unauthorized")
    assert_error(login.post("/token/refresh", {}), 400, "InvalidInput")


def test_an_expired_refresh_token_is_refused(login, db_url):
    user = register(login)
    tokens = password_login(login, user["username"]).json()
    execute(db_url, "UPDATE refresh_tokens SET expires_at = 1 WHERE uid = ?", (user["uid"],))
    assert_error(login.post("/token/refresh", {"refresh_token": tokens["refresh_token"]}), 401, "Unauthorized")


# -- sessions -----------------------------------------------------------------------------------------


def test_sessions_are_listed_and_one_can_be_ended(login, chat_server):
    user = register(login)
    phone = Client(login.base_url, token=password_login(login, user["username"]).json()["access_token"])
    laptop_tokens = login.post(
        "/login/password", {"account": user["username"], "password": PASSWORD}, headers={"User-Agent": "Laptop/1.0"}
    ).json()
    listed = phone.get("/sessions").json()["sessions"]
    assert len(listed) == 2 and sum(s["current"] for s in listed) == 1
    laptop = next(s for s in listed if s["user_agent"] == "Laptop/1.0")
    assert laptop["client_ip"] == login.ip and laptop["created_at"] and laptop["last_used_at"]
    assert phone.post("/session/revoke", {"session_id": laptop["session_id"]}).status_code == 200
    chat = Client(chat_server.base_url, token=laptop_tokens["access_token"])
    assert_error(chat.get("/chat/history", params={"role_code": "naitang"}), 401, "Unauthorized")
    assert_error(phone.post("/session/revoke", {"session_id": laptop["session_id"]}), 404, "SessionNotFound")
    stranger = register(login)
    other = Client(login.base_url, token=password_login(login, stranger["username"]).json()["access_token"])
    own = phone.get("/sessions").json()["sessions"][0]["session_id"]
    assert_error(other.post("/session/revoke", {"session_id": own}), 404, "SessionNotFound")  # not theirs
    assert phone.get("/me").status_code == 200


def test_logout_ends_the_session_and_logout_all_ends_every_one(login, chat_server):
    user = register(login)
    a = password_login(login, user["username"]).json()
    b = password_login(login, user["username"]).json()
    c = password_login(login, user["username"]).json()
    assert Client(login.base_url, token=a["access_token"]).post("/logout", {}).status_code == 200
    assert_error(login.post("/token/refresh", {"refresh_token": a["refresh_token"]}), 401, "Unauthorized")
    assert Client(chat_server.base_url, token=b["access_token"]).get("/chat/roles").status_code == 200
    res = Client(login.base_url, token=b["access_token"]).post("/logout/all", {})
    assert res.status_code == 200 and res.json()["ended_sessions"] == 2
    for tokens in (b, c):
        chat = Client(chat_server.base_url, token=tokens["access_token"])
        assert_error(chat.get("/chat/history", params={"role_code": "naitang"}), 401, "Unauthorized")
        assert_error(login.post("/token/refresh", {"refresh_token": tokens["refresh_token"]}), 401, "Unauthorized")
    assert password_login(login, user["username"]).status_code == 200  # a new sign-in works


# -- profile ------------------------------------------------------------------------------------------


def test_the_profile_can_be_read_and_updated(login):
    email = f"{uname()}@example.com"
    user = register(login, email=email)
    me = Client(login.base_url, token=password_login(login, user["username"]).json()["access_token"])
    profile = me.get("/me").json()["user"]
    assert profile["username"] == user["username"] and profile["email"] == f"{email[0]}***@example.com"
    assert profile["has_password"] is True and profile["phone_number"] == ""
    res = me.post(
        "/me/update", {"nickname": " 晚风 ", "avatar_url": "https://cdn.example.com/a.png", "bio": "爱喝龙井"}
    )
    assert res.status_code == 200, res.text
    updated = res.json()["user"]
    assert (updated["nickname"], updated["avatar_url"], updated["bio"]) == (
        "晚风",
        "https://cdn.example.com/a.png",
        "爱喝龙井",
    )
    assert me.post("/me/update", {"bio": None}).json()["user"]["bio"] is None
    assert me.get("/me").json()["user"]["nickname"] == "晚风"  # an absent field stays


@pytest.mark.parametrize(
    "body",
    [
        {"avatar_url": "http://cdn.example.com/a.png"},
        {"avatar_url": "javascript:alert(1)"},
        {"avatar_url": "https://user:pw@cdn.example.com/a.png"},
        {"avatar_url": "https://" + "a" * 600 + ".com"},
        {"nickname": "n" * 33},
        {"nickname": "two\nlines"},
        {"bio": "b" * 201},
        {"bio": 5},
        {"username": "rename-me"},
    ],
)
def test_profile_updates_are_checked(login, body):
    user = register(login)
    me = Client(login.base_url, token=password_login(login, user["username"]).json()["access_token"])
    assert_error(me.post("/me/update", body), 400, "InvalidInput")


# -- throttling ---------------------------------------------------------------------------------------


def test_failed_logins_are_throttled_per_account_across_instances(start_server, db_url, fake_dysms):
    env = {"AICHAT_DB_URL": db_url, "AICHAT_PASSWORD_FAIL_PER_ACCOUNT": "3", "AICHAT_PASSWORD_FAIL_PER_IP": "100"}
    one, two = start_server("login", **env), start_server("login", **env)
    user = register(Client(one.base_url))
    for server in (one, two, one):
        assert_error(
            password_login(Client(server.base_url), user["username"], "wrong-pass-1"), 401, "InvalidCredentials"
        )
    res = password_login(Client(two.base_url), user["username"])  # even the right password, for now
    assert_error(res, 429, "RateLimited")
    assert 1 <= int(res.headers["Retry-After"]) <= 900


def test_failed_logins_are_throttled_per_ip(start_server, db_url):
    server = start_server("login", AICHAT_DB_URL=db_url, AICHAT_PASSWORD_FAIL_PER_IP="3")
    caller = Client(server.base_url)
    for _ in range(3):
        assert_error(password_login(caller, uname(), "whatever-123"), 401, "InvalidCredentials")
    assert_error(password_login(caller, uname(), "whatever-123"), 429, "RateLimited")
    assert_error(password_login(Client(server.base_url), uname(), "whatever-123"), 401, "InvalidCredentials")


# -- deletion -----------------------------------------------------------------------------------------


def test_account_deletion_erases_the_password_sessions_and_refresh_tokens(login, db_url):
    user = register(login, email=f"{uname()}@example.com")
    tokens = password_login(login, user["username"]).json()
    me = Client(login.base_url, token=tokens["access_token"])
    assert me.post("/account/delete", {}).status_code == 200
    for table in ("users", "sessions", "refresh_tokens"):
        assert query(db_url, f"SELECT COUNT(*) FROM {table} WHERE uid = ?", (user["uid"],)) == [(0,)]
    assert_error(login.post("/token/refresh", {"refresh_token": tokens["refresh_token"]}), 401, "Unauthorized")
    assert_error(password_login(login, user["username"]), 401, "InvalidCredentials")
    register(login, username=user["username"])  # the name is free again


def test_an_all_digit_username_logs_in_by_name(login):
    name = "2026" + secrets.token_hex(3).translate(str.maketrans("abcdef", "123456"))
    user = register(login, username=name)
    assert password_login(login, name).json()["user"]["uid"] == user["uid"]
