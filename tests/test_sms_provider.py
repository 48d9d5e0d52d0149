"""Tests of aichat.sms against the real Dysmsapi SDK talking to dev/fake_dysms.py over loopback HTTP."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aichat.accounts.sms import (
    ConsoleSmsProvider,
    DysmsProvider,
    SmsError,
    SmsReceipt,
    SmsRejected,
    SmsUnavailable,
)

from dev.fake_dysms import FakeDysms

# Only on Python >= 3.12: the SDK's Utils.get_timestamp calls datetime.utcnow() on every request.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:datetime\.datetime\.utcnow\(\) is deprecated:DeprecationWarning:alibabacloud_tea_openapi\.utils"
)

REPO = Path(__file__).resolve().parents[1]
FAKE_AK_ID = "FAKE_TEST_AK_ID"
FAKE_AK_SECRET = "FAKE_TEST_AK_SECRET"
FAKE_STS_TOKEN = "FAKE_TEST_STS_TOKEN"
SIGN_NAME = "测试签名"
TEMPLATE_CODE = "SMS_000000001"


@pytest.fixture
def fake():
    """A running fake Dysmsapi, stopped (and its threads joined) after the test."""
    server = FakeDysms().start()
    try:
        yield server
    finally:
        server.stop()


def make_provider(endpoint: str, **overrides) -> DysmsProvider:
    """A DysmsProvider with fake credentials and short timeouts pointed at endpoint."""
    settings = {
        "access_key_id": FAKE_AK_ID,
        "access_key_secret": FAKE_AK_SECRET,
        "security_token": FAKE_STS_TOKEN,
        "endpoint": endpoint,
        "sign_name": SIGN_NAME,
        "template_code": TEMPLATE_CODE,
        "connect_timeout_ms": 1000,
        "read_timeout_ms": 2000,
    }
    settings.update(overrides)
    return DysmsProvider(**settings)


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("country_code", "phone_number", "expected"),
    [
        ("86", "13800138000", "13800138000"),
        ("852", "91234567", "85291234567"),
        ("+1", "2015550123", "12015550123"),
    ],
)
@pytest.mark.parametrize("security_token", [FAKE_STS_TOKEN, None])
def test_send_success(fake, country_code, phone_number, expected, security_token):
    provider = make_provider(fake.endpoint, security_token=security_token)

    receipt = provider.send(phone_number=phone_number, country_code=country_code, code="123456")

    [reply] = fake.replies
    assert receipt == SmsReceipt(request_id=reply["RequestId"], biz_id=reply["BizId"])
    uuid.UUID(receipt.request_id)
    assert receipt.biz_id.endswith("^0")
    assert fake.sent == [
        {
            "phone_numbers": expected,
            "sign_name": SIGN_NAME,
            "template_code": TEMPLATE_CODE,
            "template_param": {"code": "123456"},
            "access_key_id": FAKE_AK_ID,
        }
    ]
    assert fake.last_code(expected) == "123456"


def test_client_is_built_once_and_shared_across_threads(fake):
    provider = make_provider(fake.endpoint)
    provider.send(phone_number="13800138000", country_code="86", code="000001")
    client = provider._client
    numbers = [f"1380013800{i}" for i in range(8)]
    errors: list[BaseException] = []

    def send(number: str) -> None:
        try:
            provider.send(phone_number=number, country_code="86", code=number[-6:])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in numbers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert provider._client is client
    assert [fake.last_code(n) for n in numbers] == [n[-6:] for n in numbers]


@pytest.mark.parametrize(
    ("provider_code", "bad_number"),
    [
        ("isv.BUSINESS_LIMIT_CONTROL", False),
        ("isv.MOBILE_NUMBER_ILLEGAL", True),
        ("isv.MOBILE_COUNT_OVER_LIMIT", False),
        ("isv.DAY_LIMIT_CONTROL", False),
    ],
)
def test_business_error_is_rejected(fake, provider_code, bad_number):
    fake.script("13800138000", "business_error", code=provider_code)

    with pytest.raises(SmsRejected) as info:
        make_provider(fake.endpoint).send(phone_number="13800138000", country_code="86", code="123456")

    assert info.value.provider_code == provider_code
    assert info.value.bad_number is bad_number
    assert isinstance(info.value, SmsError)
    assert fake.last_code("13800138000") is None


def test_business_error_default_code(fake):
    fake.script("13800138000", "business_error")

    with pytest.raises(SmsRejected) as info:
        make_provider(fake.endpoint).send(phone_number="13800138000", country_code="86", code="123456")

    assert info.value.provider_code == "isv.BUSINESS_LIMIT_CONTROL"
    assert info.value.bad_number is False


def test_http_500_is_unavailable(fake):
    fake.script("13800138000", "http_500")

    with pytest.raises(SmsUnavailable) as info:
        make_provider(fake.endpoint).send(phone_number="13800138000", country_code="86", code="123456")

    assert info.value.provider_code == "InternalError"
    assert "HTTP 500" in str(info.value)
    assert len(fake.sent) == 1, "the SDK must not retry on its own"


def test_hang_times_out_fast(fake):
    fake.script("13800138000", "hang", seconds=10)
    provider = make_provider(fake.endpoint, read_timeout_ms=300)

    started = time.monotonic()
    with pytest.raises(SmsUnavailable) as info:
        provider.send(phone_number="13800138000", country_code="86", code="123456")
    elapsed = time.monotonic() - started

    assert elapsed < 3, f"send took {elapsed:.2f}s against a 10s hang"
    assert info.value.provider_code is None
    assert "Timeout" in str(info.value)


def test_stop_does_not_wait_for_hung_request():
    # Other fakes (e.g. the session's) may be running: only threads started here must be gone.
    before = set(threading.enumerate())
    server = FakeDysms().start()
    server.script("13800138000", "hang", seconds=30)
    provider = make_provider(server.endpoint, read_timeout_ms=200)
    with pytest.raises(SmsUnavailable):
        provider.send(phone_number="13800138000", country_code="86", code="123456")

    started = time.monotonic()
    server.stop()

    assert time.monotonic() - started < 3
    leftover = [
        t.name for t in set(threading.enumerate()) - before if "fake-dysms" in t.name or "process_request" in t.name
    ]
    assert leftover == []


def test_connection_refused_is_unavailable():
    provider = make_provider(f"http://127.0.0.1:{closed_port()}")

    with pytest.raises(SmsUnavailable) as info:
        provider.send(phone_number="13800138000", country_code="86", code="123456")

    assert info.value.provider_code is None


def test_nothing_sensitive_is_logged_or_chained(fake, caplog, monkeypatch):
    # DEBUG=sdk makes darabonba-core log full request URLs unless aichat.sms silences it.
    monkeypatch.setenv("DEBUG", "sdk")
    caplog.set_level(logging.DEBUG)
    code = "987654"
    provider = make_provider(fake.endpoint, read_timeout_ms=300)
    fake.script("13800138001", "business_error", code="isv.MOBILE_NUMBER_ILLEGAL")
    fake.script("13800138002", "http_500")
    fake.script("13800138003", "hang", seconds=5)

    provider.send(phone_number="13800138000", country_code="86", code=code)
    raised: list[SmsError] = []
    for number in ("13800138001", "13800138002", "13800138003"):
        with pytest.raises(SmsError) as info:
            provider.send(phone_number=number, country_code="86", code=code)
        raised.append(info.value)
    with pytest.raises(SmsUnavailable) as info:
        make_provider(f"http://127.0.0.1:{closed_port()}").send(
            phone_number="13800138004", country_code="86", code=code
        )
    raised.append(info.value)

    # The fake's own access log shows request lines on purpose; only the provider side must stay clean.
    texts = [record.getMessage() for record in caplog.records if record.name != "fake_dysms"]
    texts += [str(exc) for exc in raised] + [repr(provider)]
    for secret in (code, FAKE_AK_SECRET, FAKE_STS_TOKEN, "1380013800"):
        assert not [t for t in texts if secret in t], secret
    # SDK/requests exceptions embed the request URL, so none may ride along as a cause or context.
    assert all(exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__) for exc in raised)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "aichat.sms"]
    assert len(warnings) == 4
    assert any("***8001" in w and "isv.MOBILE_NUMBER_ILLEGAL" in w for w in warnings)


def test_console_provider_logs_code(caplog):
    caplog.set_level(logging.INFO, logger="aichat.sms")

    receipt = ConsoleSmsProvider().send(phone_number="13800138000", country_code="86", code="123456")

    assert [r.getMessage() for r in caplog.records if r.name == "aichat.sms"] == ["SMS code for 13800138000: 123456"]
    assert receipt.biz_id == "CONSOLE"
    assert receipt.request_id.startswith("CONSOLE-")
    uuid.UUID(hex=receipt.request_id.removeprefix("CONSOLE-"))


@pytest.mark.parametrize(
    "endpoint",
    ["", "ftp://dysmsapi.aliyuncs.com", "http://127.0.0.1:8080/api", "http://127.0.0.1:notaport", "http://"],
)
def test_bad_endpoint_is_rejected_at_construction(endpoint):
    with pytest.raises(ValueError):
        make_provider(endpoint)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("dysmsapi.aliyuncs.com", "https://dysmsapi.aliyuncs.com"),
        ("https://dysmsapi.aliyuncs.com/", "https://dysmsapi.aliyuncs.com"),
        ("http://127.0.0.1:18080", "http://127.0.0.1:18080"),
    ],
)
def test_endpoint_forms(endpoint, expected):
    assert f"endpoint={expected}," in repr(make_provider(endpoint))


def test_importing_sms_does_not_import_sdk():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "layers/common/python"), str(REPO)])}
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "import aichat.accounts.sms, sys; print(any(m.startswith('alibabacloud') for m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "False"


def test_fake_reset_and_script_validation(fake):
    fake.script("13800138000", "http_500")
    with pytest.raises(SmsUnavailable):
        make_provider(fake.endpoint).send(phone_number="13800138000", country_code="86", code="111111")
    fake.reset()
    assert fake.sent == []
    assert fake.replies == []

    make_provider(fake.endpoint).send(phone_number="13800138000", country_code="86", code="222222")
    assert fake.last_code("13800138000") == "222222"
    with pytest.raises(ValueError):
        fake.script("13800138000", "explode")


def test_fake_answers_like_dysmsapi(fake):
    import requests

    response = requests.post(
        fake.endpoint + "/",
        data={
            "Action": "SendSms",
            "AccessKeyId": FAKE_AK_ID,
            "PhoneNumbers": "13800138000",
            "SignName": SIGN_NAME,
            "TemplateCode": TEMPLATE_CODE,
            "TemplateParam": json.dumps({"code": "424242"}),
        },
        timeout=5,
    )

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"RequestId", "BizId", "Code", "Message"}
    assert body["Code"] == "OK"
    assert fake.sent[0]["access_key_id"] == FAKE_AK_ID
    assert fake.last_code("13800138000") == "424242"


def test_credential_rotation_never_hands_out_a_missing_client(monkeypatch):
    # FC's role credentials rotate while other threads send: a thread must never get a None client.
    import threading

    from aichat.accounts.sms import DysmsProvider
    from aichat.fc import Credentials

    provider = DysmsProvider(
        access_key_id="id",
        access_key_secret="secret",
        security_token=None,
        sign_name="sign",
        template_code="SMS_1",
        endpoint="http://127.0.0.1:9",
        connect_timeout_ms=100,
        read_timeout_ms=100,
    )
    built = provider._build_client

    def slow_build(*args):
        time.sleep(0.001)  # widen the window a check-then-return race would fall into
        return built(*args)

    monkeypatch.setattr(provider, "_build_client", slow_build)
    clients: list[object] = []

    def rotate(n: int) -> None:
        for i in range(40):
            creds = Credentials(f"id-{(n + i) % 3}", "secret", f"token-{(n + i) % 3}")
            clients.append(provider._client_for(creds))

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(clients) == 320 and all(client is not None for client in clients)
