"""LoginService over real HTTP: the contract's send_code/login behaviour, validation and the web glue."""

from __future__ import annotations

import json
import re

import jwt
import pytest
import requests

from tests.helpers import TEST_SECRET, Client, assert_error, random_phone, send_and_read_code

# Token liveness, limits and throttles: these tests run a third time with Redis holding that state.
pytestmark = pytest.mark.redis_state

UID = re.compile(r"[0-9a-f]{24}")


def test_health(login):
    res = login.get("/health")
    assert res.status_code == 200
    assert res.headers["Content-Type"] == "application/json; charset=utf-8"
    assert res.json() == {"success": True, "service": "login", "message": "ok"}


class TestTestAccount:
    def test_send_code_never_sends_an_sms(self, login, fake_dysms):
        before = len(fake_dysms.sent)
        res = login.post("/send_code", {"phone_number": "10086", "country_code": "86"})
        assert res.status_code == 200
        assert res.json() == {
            "success": True,
            "message": "测试账号验证码固定为 1234",
            "request_id": "TEST-LOGIN",
            "biz_id": "TEST-LOGIN",
            "is_test_account": True,
        }
        # Readable Chinese on the wire, not \\u escapes.
        assert "测试账号".encode() in res.content
        assert len(fake_dysms.sent) == before

    def test_login_with_1234(self, login):
        res = login.post("/login", {"phone_number": "10086", "country_code": "86", "verify_code": "1234"})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["success"] is True and body["message"] == "登录成功"
        assert body["token_type"] == "Bearer" and body["expires_in"] == 604800
        assert body["is_test_account"] is True
        assert body["user"]["phone_number"] == "10086" and body["user"]["country_code"] == "86"
        assert UID.fullmatch(body["user"]["uid"])
        claims = jwt.decode(body["access_token"], TEST_SECRET, algorithms=["HS256"])
        assert claims["sub"] == body["user"]["uid"]
        assert claims["exp"] - claims["iat"] == 604800

    def test_country_code_defaults_to_86(self, login):
        res = login.post("/login", {"phone_number": "10086", "verify_code": "1234"})
        assert res.status_code == 200 and res.json()["is_test_account"] is True

    def test_uid_is_stable(self, login):
        first = login.post("/login", {"phone_number": "10086", "verify_code": "1234"}).json()
        second = login.post("/login", {"phone_number": "10086", "verify_code": "1234"}).json()
        assert first["user"]["uid"] == second["user"]["uid"]

    def test_wrong_code(self, login):
        res = login.post("/login", {"phone_number": "10086", "country_code": "86", "verify_code": "4321"})
        assert_error(res, 401, "VerifyFailed")

    def test_exempt_from_limits(self, login):
        for _ in range(5):
            assert login.post("/send_code", {"phone_number": "10086"}).status_code == 200


def test_test_account_can_be_disabled(start_server, sqlite_url):
    server = start_server("login", AICHAT_DB_URL=sqlite_url, AICHAT_TEST_ACCOUNT="off")
    client = Client(server.base_url)
    assert_error(client.post("/send_code", {"phone_number": "10086"}), 400, "InvalidPhoneNumber")
    assert_error(client.post("/login", {"phone_number": "10086", "verify_code": "1234"}), 400, "InvalidPhoneNumber")


def test_test_account_is_configurable(start_server, sqlite_url):
    server = start_server("login", AICHAT_DB_URL=sqlite_url, AICHAT_TEST_ACCOUNT="86:13900000000:5678")
    client = Client(server.base_url)
    assert client.post("/send_code", {"phone_number": "13900000000"}).json()["is_test_account"] is True
    res = client.post("/login", {"phone_number": "13900000000", "verify_code": "5678"})
    assert res.status_code == 200 and res.json()["is_test_account"] is True


class TestRealNumbers:
    def test_send_code_and_login(self, login, fake_dysms):
        phone = random_phone()
        res = login.post("/send_code", {"phone_number": phone, "country_code": "86"})
        assert res.status_code == 200
        body = res.json()
        sent = [m for m in fake_dysms.sent if m["phone_numbers"] == phone][-1]
        assert body == {
            "success": True,
            "message": "验证码已发送",
            "request_id": body["request_id"],
            "biz_id": body["biz_id"],
        }
        assert body["request_id"] and body["biz_id"]
        assert sent["sign_name"] == "奶糖测试" and sent["template_code"] == "SMS_000000001"
        assert sent["access_key_id"] == "test-key-id"

        res = login.post("/login", {"phone_number": phone, "verify_code": sent["template_param"]["code"]})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["is_test_account"] is False
        assert body["user"] == {"uid": body["user"]["uid"], "phone_number": phone, "country_code": "86"}
        assert UID.fullmatch(body["user"]["uid"])

    def test_uses_the_fresh_credentials_fc_sends(self, login, fake_dysms):
        # FC passes the role's current temporary credentials on every request; they win over the env's.
        phone = random_phone()
        headers = {
            "x-fc-access-key-id": "STS.rotated-id",
            "x-fc-access-key-secret": "rotated-secret",
            "x-fc-security-token": "rotated-token",
        }
        assert login.post("/send_code", {"phone_number": phone}, headers=headers).status_code == 200
        assert [m["access_key_id"] for m in fake_dysms.sent if m["phone_numbers"] == phone] == ["STS.rotated-id"]

    def test_international_number(self, login, fake_dysms):
        phone = "91234567"
        code = send_and_read_code(login, fake_dysms, phone, country_code="852")
        res = login.post("/login", {"phone_number": phone, "country_code": "852", "verify_code": code})
        assert res.status_code == 200 and res.json()["user"]["country_code"] == "852"

    def test_code_is_single_use(self, login, fake_dysms):
        phone = random_phone()
        code = send_and_read_code(login, fake_dysms, phone)
        assert login.post("/login", {"phone_number": phone, "verify_code": code}).status_code == 200
        assert_error(login.post("/login", {"phone_number": phone, "verify_code": code}), 401, "VerifyFailed")

    def test_uid_stable_across_logins(self, start_server, db_url, fake_dysms):
        # Cooldown off so the same phone can get a second code at once.
        from tests.conftest import dysms_env

        server = start_server("login", AICHAT_DB_URL=db_url, AICHAT_CODE_RESEND_COOLDOWN=0, **dysms_env(fake_dysms))
        client = Client(server.base_url)
        phone = random_phone()
        uids = []
        for _ in range(2):
            code = send_and_read_code(client, fake_dysms, phone)
            uids.append(client.post("/login", {"phone_number": phone, "verify_code": code}).json()["user"]["uid"])
        assert uids[0] == uids[1]

    def test_new_code_supersedes_old(self, start_server, db_url, fake_dysms):
        from tests.conftest import dysms_env

        server = start_server("login", AICHAT_DB_URL=db_url, AICHAT_CODE_RESEND_COOLDOWN=0, **dysms_env(fake_dysms))
        client = Client(server.base_url)
        phone = random_phone()
        old = send_and_read_code(client, fake_dysms, phone)
        new = send_and_read_code(client, fake_dysms, phone)
        if old != new:
            assert_error(client.post("/login", {"phone_number": phone, "verify_code": old}), 401, "VerifyFailed")
        assert client.post("/login", {"phone_number": phone, "verify_code": new}).status_code == 200

    def test_wrong_attempts_burn_the_code(self, login, fake_dysms):
        phone = random_phone()
        code = send_and_read_code(login, fake_dysms, phone)
        wrong = "000000" if code != "000000" else "111111"
        for _ in range(5):
            assert_error(login.post("/login", {"phone_number": phone, "verify_code": wrong}), 401, "VerifyFailed")
        # Burned: even the right code fails now.
        assert_error(login.post("/login", {"phone_number": phone, "verify_code": code}), 401, "VerifyFailed")

    def test_code_expires(self, start_server, sqlite_url, fake_dysms):
        import time

        from tests.conftest import dysms_env

        server = start_server("login", AICHAT_DB_URL=sqlite_url, AICHAT_CODE_TTL=1, **dysms_env(fake_dysms))
        client = Client(server.base_url)
        phone = random_phone()
        code = send_and_read_code(client, fake_dysms, phone)
        time.sleep(1.2)
        assert_error(client.post("/login", {"phone_number": phone, "verify_code": code}), 401, "VerifyFailed")

    def test_no_code_sent(self, login):
        res = login.post("/login", {"phone_number": random_phone(), "verify_code": "123456"})
        assert_error(res, 401, "VerifyFailed")

    def test_codes_never_reach_the_log(self, login, login_server, fake_dysms):
        phone = random_phone()
        code = send_and_read_code(login, fake_dysms, phone)
        login.post("/login", {"phone_number": phone, "verify_code": code})
        log = login_server.log()
        assert code not in log
        assert phone not in log  # masked to the last four digits


class TestSmsFailures:
    @pytest.mark.parametrize(
        ("mode", "kw", "status", "code"),
        [
            ("business_error", {"code": "isv.BUSINESS_LIMIT_CONTROL"}, 400, "SendCodeFailed"),
            ("business_error", {"code": "isv.MOBILE_NUMBER_ILLEGAL"}, 400, "InvalidPhoneNumber"),
            ("http_500", {}, 500, "SendCodeFailed"),
            ("hang", {"seconds": 5}, 500, "SendCodeFailed"),
        ],
    )
    def test_failure_maps_to_contract_error(self, login, fake_dysms, mode, kw, status, code):
        phone = random_phone()
        fake_dysms.script(phone, mode, **kw)
        res = login.post("/send_code", {"phone_number": phone})
        assert_error(res, status, code)
        assert res.elapsed.total_seconds() < 4  # the SDK's read timeout, not the hang, decides
        # Whatever code was generated for the failed SMS is never usable.
        unsent = fake_dysms.received_code(phone)  # what the gateway was asked to send, answered or not
        assert unsent is not None and re.fullmatch(r"[0-9]{6}", unsent)
        res = login.post("/login", {"phone_number": phone, "verify_code": unsent})
        assert_error(res, 401, "VerifyFailed")
        # The failure released the resend slot: once the gateway recovers, the user can retry at once.
        fake_dysms.script(phone, "ok")
        assert login.post("/send_code", {"phone_number": phone}).status_code == 200


class TestValidation:
    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({}, "InvalidInput"),
            ({"country_code": "86"}, "InvalidInput"),
            ({"phone_number": 13800138000}, "InvalidInput"),
            ({"phone_number": None}, "InvalidInput"),
            ({"phone_number": ["13800138000"]}, "InvalidInput"),
            ({"phone_number": "1380013800"}, "InvalidPhoneNumber"),
            ({"phone_number": "138001380001"}, "InvalidPhoneNumber"),
            ({"phone_number": "23800138000"}, "InvalidPhoneNumber"),
            ({"phone_number": "1380013800a"}, "InvalidPhoneNumber"),
            ({"phone_number": "１３８００１３８０００"}, "InvalidPhoneNumber"),
            ({"phone_number": "13800138000", "country_code": "12345"}, "InvalidPhoneNumber"),
            ({"phone_number": "13800138000", "country_code": "8a"}, "InvalidPhoneNumber"),
            ({"phone_number": "123", "country_code": "1"}, "InvalidPhoneNumber"),
            ({"phone_number": "1234567890123456", "country_code": "1"}, "InvalidPhoneNumber"),
            ({"phone_number": "13800138000", "country_code": 86}, "InvalidInput"),
        ],
    )
    def test_send_code_rejects(self, login_app, fake_dysms, body, code):
        before = len(fake_dysms.sent)
        assert_error(login_app.post("/send_code", body), 400, code)
        assert len(fake_dysms.sent) == before

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({"phone_number": "10086"}, "InvalidInput"),
            ({"phone_number": "10086", "verify_code": 1234}, "InvalidInput"),
            ({"phone_number": "10086", "verify_code": "123"}, "InvalidVerifyCode"),
            ({"phone_number": "10086", "verify_code": "123456789"}, "InvalidVerifyCode"),
            ({"phone_number": "10086", "verify_code": "12a4"}, "InvalidVerifyCode"),
            ({"phone_number": "1380013800", "verify_code": "1234"}, "InvalidPhoneNumber"),
            # Formats are checked before anything else: a bad phone wins over a bad code.
            ({"phone_number": "1", "verify_code": "x"}, "InvalidPhoneNumber"),
        ],
    )
    def test_login_rejects(self, login_app, body, code):
        assert_error(login_app.post("/login", body), 400, code)

    @pytest.mark.parametrize("raw", [b"{", b"not json", b"[1,2]", b'"text"', b"null", b"\xff\xfe"])
    def test_malformed_json(self, login_app, raw):
        res = login_app.post("/send_code", data=raw, headers={"Content-Type": "application/json"})
        assert_error(res, 400, "InvalidInput")

    def test_body_over_the_cap(self, login):
        raw = json.dumps({"phone_number": "10086", "pad": "x" * 70_000}).encode()
        res = login.post("/send_code", data=raw, headers={"Content-Type": "application/json"})
        assert_error(res, 413, "PayloadTooLarge")

    def test_unknown_path(self, login):
        assert_error(login.get("/nope"), 404, "NotFound")

    def test_wrong_method(self, login):
        res = login.get("/send_code")
        assert_error(res, 405, "MethodNotAllowed")
        assert "POST" in res.headers["Allow"]


class TestCors:
    def test_preflight(self, login):
        res = requests.options(
            login.base_url + "/login",
            headers={
                "Origin": "http://localhost:5173",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
            timeout=5,
        )
        assert res.status_code == 204
        assert res.headers["Access-Control-Allow-Origin"] == "*"
        allowed = {h.strip().lower() for h in res.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert "POST" in res.headers["Access-Control-Allow-Methods"]

    def test_simple_request_and_error_carry_cors(self, login):
        assert (
            login.get("/health", headers={"Origin": "http://a.example"}).headers["Access-Control-Allow-Origin"] == "*"
        )
        res = login.post("/login", {}, headers={"Origin": "http://a.example"})
        assert res.status_code == 400 and res.headers["Access-Control-Allow-Origin"] == "*"

    def test_configured_origins(self, start_server, sqlite_url):
        server = start_server("login", AICHAT_DB_URL=sqlite_url, AICHAT_CORS_ORIGINS="https://app.example")
        ok = requests.get(server.base_url + "/health", headers={"Origin": "https://app.example"}, timeout=5)
        assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Origin" in ok.headers["Vary"]
        other = requests.get(server.base_url + "/health", headers={"Origin": "https://evil.example"}, timeout=5)
        assert "Access-Control-Allow-Origin" not in other.headers


def test_request_id_from_fc_header(login, login_server):
    res = login.get("/health", headers={"x-fc-request-id": "fc-req-123"})
    assert res.headers["X-Request-Id"] == "fc-req-123"
    lines = [json.loads(line) for line in login_server.log().splitlines() if line.startswith("{")]
    assert any(line["request_id"] == "fc-req-123" and line.get("operation_id") == "login_health" for line in lines)


def test_console_provider_logs_the_code(start_server, sqlite_url):
    server = start_server("login", AICHAT_DB_URL=sqlite_url)
    client = Client(server.base_url)
    phone = random_phone()
    assert client.post("/send_code", {"phone_number": phone}).status_code == 200
    match = re.search(rf"SMS code for {phone}: ([0-9]{{6}})", server.log())
    assert match, server.log()
    assert client.post("/login", {"phone_number": phone, "verify_code": match.group(1)}).status_code == 200
