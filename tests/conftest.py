"""Shared fixtures: a database per backend (SQLite always, MySQL when configured, and SQLite with Redis for
the suites marked redis_state), fakes and servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aichat.config import Settings
from flask.testing import FlaskClient

from dev.fake_dysms import FakeDysms
from dev.fake_llm import FakeLLM
from dev.fake_tools import FakeTools
from dev.fake_tts import FakeTts
from tests.helpers import REDIS_OF, TEST_SECRET, AppClient, Client, ServerProcess, base_env, load_function, random_phone

MYSQL_URL = os.environ.get("AICHAT_TEST_MYSQL_URL", "")
# The machine's Redis, a database number of its own (flushed once per run).
REDIS_URL = os.environ.get("AICHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    """In CI the MySQL suite is required: refuse to run without it rather than skip it silently."""
    if IN_CI and not MYSQL_URL:
        raise pytest.UsageError("CI=true but AICHAT_TEST_MYSQL_URL is not set: the MySQL suite is required")


BACKENDS = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]
# Suites that touch what Redis takes over (token liveness, chat limits and slots, SMS and password limits)
# run a third time with it.
REDIS_BACKENDS = [*BACKENDS, pytest.param("redis", marks=pytest.mark.redis)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """db_url's backends: the third, Redis, for the modules marked redis_state."""
    if "db_url" in metafunc.fixturenames:
        backends = REDIS_BACKENDS if metafunc.definition.get_closest_marker("redis_state") else BACKENDS
        metafunc.parametrize("db_url", backends, indirect=True, scope="session")


@contextmanager
def fresh_mysql_database(prefix: str) -> Iterator[str]:
    """A MySQL database of its own on the configured server (fail in CI, skip locally, if unreachable)."""
    if not MYSQL_URL:
        pytest.skip("AICHAT_TEST_MYSQL_URL is not set")
    import pymysql

    parts = urlsplit(MYSQL_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        conn = pymysql.connect(
            host=parts.hostname,
            port=parts.port or 3306,
            user=parts.username or "root",
            password=parts.password or "",
            connect_timeout=5,
        )
    except pymysql.MySQLError as exc:
        if IN_CI:
            pytest.fail(f"MySQL at {parts.hostname}:{parts.port} is unreachable: {exc}")
        pytest.skip(f"MySQL unreachable: {exc}")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture(scope="session")
def mysql_server_url() -> Iterator[str]:
    """A fresh MySQL database for this test session, dropped afterwards."""
    with fresh_mysql_database("aichat_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis, database 15 of its own, emptied once per run (required in CI, like MariaDB)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis is required in CI and is not reachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def rdb(redis_url: str) -> Iterator[Any]:
    """A client of the test Redis, for tests that look at its keys."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database URL of one backend; every server of the session on that backend shares it."""
    if request.param == "mysql":
        return request.getfixturevalue("mysql_server_url")
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'aichat.db'}"
    if request.param == "redis":
        REDIS_OF[url] = request.getfixturevalue("redis_url")
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite database for tests whose behaviour does not depend on the backend."""
    return f"sqlite:///{tmp_path_factory.mktemp('db1') / 'aichat.db'}"


@pytest.fixture(scope="session")
def fake_dysms() -> Iterator[FakeDysms]:
    """The fake Dysmsapi endpoint the real Alibaba SDK talks to."""
    fake = FakeDysms().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start a service process with environment overrides; all are stopped at the end of the session."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("logs")

    def start(function: str, **env: object) -> ServerProcess:
        if env.get("AICHAT_DB_URL") in REDIS_OF:
            env.setdefault("AICHAT_REDIS_URL", REDIS_OF[str(env["AICHAT_DB_URL"])])
        server = ServerProcess(function, base_env(**env), log_dir)
        started.append(server)
        return server.wait_ready("/health" if function == "login" else "/chat/roles")

    yield start
    for server in started:  # all at once, so lingering ones overlap their waits
        server.signal_stop()
    for server in started:
        server.stop()


def dysms_env(fake: FakeDysms) -> dict[str, object]:
    """Settings that send SMS through the real SDK to the fake Dysmsapi."""
    return {
        "AICHAT_SMS_PROVIDER": "dysms",
        "AICHAT_SMS_ENDPOINT": fake.endpoint,
        "AICHAT_SMS_SIGN_NAME": "奶糖测试",
        "AICHAT_SMS_TEMPLATE_CODE": "SMS_000000001",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "test-key-id",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "test-key-secret",
        "AICHAT_SMS_READ_TIMEOUT_MS": "1000",
    }


@pytest.fixture(scope="session")
def login_server(start_server, db_url, fake_dysms) -> ServerProcess:
    """LoginService on the backend under test, sending SMS to the fake Dysmsapi."""
    return start_server("login", AICHAT_DB_URL=db_url, **dysms_env(fake_dysms))


@pytest.fixture
def login(login_server) -> Client:
    """A fresh caller (its own IP) of LoginService."""
    return Client(login_server.base_url)


ROLES_FILE = str(Path(__file__).resolve().parent.parent / "template" / "roles.json")


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLM]:
    """The fake OpenAI-compatible upstream every chat server of the session talks to."""
    fake = FakeLLM(delay=0.002).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLM) -> FakeLLM:
    """The fake upstream with no scripts queued and no requests recorded."""
    fake_llm_server.reset()
    return fake_llm_server


def chat_env(fake: FakeLLM, db_url: str, **overrides: object) -> dict[str, object]:
    """Settings for a ChatService that relays to the fake upstream."""
    return {
        "AICHAT_DB_URL": db_url,
        "AICHAT_LLM_BASE_URL": fake.base_url,
        "AICHAT_LLM_API_KEY": "test-llm-key",
        "AICHAT_ROLES_FILE": ROLES_FILE,
        "AICHAT_LLM_READ_TIMEOUT": "5",
        **({"AICHAT_REDIS_URL": REDIS_OF[db_url]} if db_url in REDIS_OF else {}),
        **overrides,
    }


@pytest.fixture(scope="session")
def chat_module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """functions/chat/app.py imported into the test process, for build_app() with settings of a test's own."""
    db = tmp_path_factory.mktemp("import-db") / "aichat.db"
    return load_function("chat", {"AICHAT_JWT_SECRET": TEST_SECRET, "AICHAT_DB_URL": f"sqlite:///{db}"})


@pytest.fixture
def chat_app(chat_module, db_url, fake_llm) -> Callable[..., FlaskClient]:
    """An in-process ChatService (Flask's test client) on the backend under test, with settings overrides.

    For what does not cross the wire (validation, context assembly, settings): no server process to start.
    """
    apps: list[Any] = []

    def make(**overrides: Any) -> FlaskClient:
        values: dict[str, Any] = {
            "service": "chat",
            "env": "test",
            "jwt_secret": TEST_SECRET,
            "db_url": db_url,
            "llm_base_url": fake_llm.base_url,
            "llm_api_key": "test-llm-key",
            "roles_file": ROLES_FILE,
            "llm_read_timeout_s": 5.0,
            "trust_proxy": True,
            "redis_url": REDIS_OF.get(db_url, ""),
            **overrides,
        }
        app = chat_module.build_app(Settings(**values))
        apps.append(app)
        return app.test_client()

    return make


@pytest.fixture
def app_user(chat_app, new_user) -> AppClient:
    """A fresh logged-in user of an in-process ChatService with the default test settings."""
    return AppClient(chat_app(), token=new_user()[1])


@pytest.fixture(scope="session")
def login_module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """functions/login/app.py imported into the test process, for build_app() with settings of a test's own."""
    db = tmp_path_factory.mktemp("import-login-db") / "aichat.db"
    return load_function("login", {"AICHAT_JWT_SECRET": TEST_SECRET, "AICHAT_DB_URL": f"sqlite:///{db}"})


@pytest.fixture
def login_app(login_module, db_url, fake_dysms) -> AppClient:
    """An in-process LoginService (Flask's test client) on the backend under test, sending SMS to the fake."""
    env = dysms_env(fake_dysms)
    settings = Settings(
        service="login",
        env="test",
        jwt_secret=TEST_SECRET,
        db_url=db_url,
        redis_url=REDIS_OF.get(db_url, ""),
        trust_proxy=True,
        sms_provider="dysms",
        sms_endpoint=str(env["AICHAT_SMS_ENDPOINT"]),
        sms_sign_name=str(env["AICHAT_SMS_SIGN_NAME"]),
        sms_template_code=str(env["AICHAT_SMS_TEMPLATE_CODE"]),
        alibaba_access_key_id="test-key-id",
        alibaba_access_key_secret="test-key-secret",
        sms_read_timeout_ms=1000,
    )
    return AppClient(login_module.build_app(settings).test_client())


@pytest.fixture(scope="session")
def chat_server(start_server, db_url, fake_llm_server) -> ServerProcess:
    """ChatService on the backend under test."""
    return start_server("chat", **chat_env(fake_llm_server, db_url))


@pytest.fixture
def new_user(login_server, fake_dysms) -> Callable[[], tuple[str, str]]:
    """Log a brand-new user in through LoginService; returns (uid, token)."""

    def make() -> tuple[str, str]:
        client = Client(login_server.base_url)
        phone = random_phone()
        assert client.post("/send_code", {"phone_number": phone}).status_code == 200
        body = client.post("/login", {"phone_number": phone, "verify_code": fake_dysms.last_code(phone)}).json()
        return body["user"]["uid"], body["access_token"]

    return make


@pytest.fixture
def user(chat_server, new_user) -> Client:
    """A fresh logged-in user talking to ChatService."""
    _, token = new_user()
    return Client(chat_server.base_url, token=token)


@pytest.fixture(scope="session")
def fake_tools_server() -> Iterator[FakeTools]:
    """The fake weather and hot-board providers (AMap, QWeather, Baidu, Toutiao) tools call in tests."""
    fake = FakeTools().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_tools(fake_tools_server: FakeTools) -> FakeTools:
    """The fake providers with no faults scripted and no requests recorded."""
    fake_tools_server.reset()
    return fake_tools_server


@pytest.fixture(scope="session")
def fake_tts_server() -> Iterator[FakeTts]:
    """The fake DashScope TTS /chat/voice synthesises with (the chat_env LLM key is the DashScope key)."""
    fake = FakeTts(api_key="test-llm-key").start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_tts(fake_tts_server: FakeTts) -> FakeTts:
    """The fake TTS with no faults scripted and no requests recorded."""
    fake_tts_server.reset()
    return fake_tts_server
