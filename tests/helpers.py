"""Test helpers: real server processes (each FC function under gunicorn on loopback), clients, SSE reading,
the contract's error check and direct database reads. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from dev.launch import function_dir, gunicorn

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "layers" / "common" / "python"
TEST_SECRET = "test-secret-" + "x" * 40


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The Redis deployed with a test database (the third backend, tests/conftest.py): every server, in-process
# app and chat_env on that database gets it as AICHAT_REDIS_URL, unless the test sets that itself. (Here, not
# in conftest, which pytest imports under a second name.)
REDIS_OF: dict[str, str] = {}


def with_redis(db_url: str) -> bool:
    """Whether the backend under test is the one with Redis."""
    return db_url in REDIS_OF


def base_env(**overrides: Any) -> dict[str, str]:
    """A minimal, hermetic environment for a service process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICHAT_", "ALIBABA_CLOUD_", "DASHSCOPE_"))}
    env.update(
        {
            "AICHAT_ENV": "test",
            "AICHAT_JWT_SECRET": TEST_SECRET,
            "AICHAT_SMS_PROVIDER": "console",
            "AICHAT_TRUST_PROXY": "1",
            "AICHAT_THREADS": "16",
            "PYTHONPATH": str(LAYER),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    for key in [k for k, v in overrides.items() if v is None]:
        env.pop(key, None)
    return env


class ServerProcess:
    """One service (login or chat) running under gunicorn, with its log captured to a file."""

    def __init__(self, function: str, env: dict[str, str], log_dir: Path) -> None:
        self.function = function
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{function}-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = gunicorn(
            function_dir(function), port=self.port, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, path: str, timeout_s: float = 20) -> ServerProcess:
        """Block until the server answers `path`; fail with its log if it dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.function} exited {self.proc.returncode}:\n{self.log()}")
            try:
                requests.get(self.base_url + path, timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.function} not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server has logged so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal_stop(self) -> None:
        """Ask the server to quit now (SIGINT is gunicorn's quick shutdown: no waiting for open streams)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout_s: float = 3) -> None:
        """Stop the server and wait for it, killing it if it lingers (e.g. threads stuck on a hung upstream)."""
        self.signal_stop()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Client:
    """requests against one server, as one caller (its own X-Forwarded-For address)."""

    def __init__(self, base_url: str, *, ip: str | None = None, token: str | None = None) -> None:
        self.base_url = base_url
        self.ip = ip or random_ip()
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Default headers: the caller's address and, once logged in, the bearer token."""
        headers = {"X-Forwarded-For": self.ip}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def get(self, path: str, **kw: Any) -> requests.Response:
        """GET a path."""
        return requests.get(self.base_url + path, headers=self.headers(kw.pop("headers", None)), timeout=30, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        """POST a JSON body (or raw `data=`) to a path."""
        headers = self.headers(kw.pop("headers", None))
        if "data" not in kw:
            kw["json"] = body
        return requests.post(self.base_url + path, headers=headers, timeout=30, **kw)


def random_phone() -> str:
    """A syntactically valid mainland mobile number that is unique enough for one test."""
    return "19" + str(uuid.uuid4().int)[:9]


def random_ip() -> str:
    """A documentation-range (TEST-NET) address unique enough for one test."""
    n = uuid.uuid4().int
    return f"198.{18 + n % 2}.{(n >> 8) % 256}.{(n >> 16) % 254 + 1}"


def sse_events(response: requests.Response) -> Iterator[tuple[float, str]]:
    """Yield (arrival time, payload) for each `data:` event the moment its bytes arrive."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield time.monotonic(), line[6:].decode("utf-8")


def read_stream(response: requests.Response) -> list[str]:
    """Every payload of an SSE response, [DONE] included."""
    return [payload for _, payload in sse_events(response)]


def frame_text(payloads: list[str]) -> str:
    """The reply text carried by a list of payloads (choices[0].delta.content, as clients read it)."""
    text = ""
    for payload in payloads:
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


def query(db_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Read rows straight from a test database (SQLite file or MySQL URL), bypassing the services."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(db_url[len("sqlite:///") :])
        try:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()
    from urllib.parse import urlsplit

    import pymysql

    parts = urlsplit(db_url)
    conn = pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=parts.path.lstrip("/"),
        charset="utf8mb4",
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            return [tuple(row) for row in cur.fetchall()]
    finally:
        conn.close()


def png_header(width: int = 2, height: int = 2) -> bytes:
    """The start of a PNG (signature and IHDR): what the service reads of an image."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def jpeg_header(width: int = 2, height: int = 2) -> bytes:
    """The start of a baseline JPEG (SOI, APP0, SOF0): what the service reads of an image."""
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0


PNG = png_header() + b"\x00" * 32
JPEG = jpeg_header() + b"\x00" * 32


def assert_error(res, status: int, code: str) -> dict:
    """The contract's error shape, with the expected status and code."""
    assert res.status_code == status, res.text
    assert res.headers["Content-Type"] == "application/json; charset=utf-8"
    body = res.json()
    assert body["success"] is False and body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


def send_and_read_code(client: Client, fake_dysms, phone: str, country_code: str = "86") -> str:
    """Ask for a code and read it off the fake SMS gateway."""
    res = client.post("/send_code", {"phone_number": phone, "country_code": country_code})
    assert res.status_code == 200, res.text
    number = phone if country_code == "86" else country_code + phone
    code = fake_dysms.last_code(number)
    assert code is not None and re.fullmatch(r"[0-9]{6}", code)
    return code


def stream(client: Client, body: dict, **kw) -> requests.Response:
    """POST /chat/stream without reading the body yet."""
    return client.post("/chat/stream", body, stream=True, **kw)


def chat_once(client: Client, body: dict) -> list[str]:
    """Send one message and read the whole reply."""
    res = stream(client, body)
    assert res.status_code == 200, res.text
    return read_stream(res)


def history(client: Client, role_code: str = "naitang") -> list[dict]:
    """The user's history with a role."""
    res = client.get("/chat/history", params={"role_code": role_code})
    assert res.status_code == 200, res.text
    return res.json()["messages"]


def load_function(function: str, env: dict[str, str]) -> Any:
    """functions/<function>/app.py as a module of its own name (both are `app.py`), imported under `env`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fc_{function}_app", function_dir(function) / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module


def events_of(body: bytes) -> list[dict]:
    """The JSON payloads of a whole SSE body (without [DONE]), for in-process test clients."""
    payloads = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert payloads and payloads[-1] == "[DONE]", body[-300:]
    return [json.loads(p) for p in payloads[:-1]]


def post_stream(client: Any, path: str, body: dict, token: str) -> tuple[int, bytes]:
    """POST to an in-process app's streamed operation, read the whole body and close it (as a WSGI server does)."""
    res = client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    try:
        return res.status_code, res.get_data()
    finally:
        res.close()


class AppResponse:
    """A requests-like view of a Flask test response, read whole and closed (the WSGI server's part)."""

    def __init__(self, response: Any) -> None:
        try:
            self.content: bytes = response.get_data()
        finally:
            response.close()
        self.status_code: int = response.status_code
        self.headers = response.headers
        self.text = self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.content)

    def iter_content(self, chunk_size: int | None = None) -> Iterator[bytes]:
        """The body (already complete) as one chunk."""
        yield self.content

    def close(self) -> None:
        """Nothing left open."""


class AppClient:
    """Client's interface over an in-process app (Flask's test client): no server process, no socket."""

    def __init__(self, app_client: Any, *, token: str | None = None) -> None:
        self.app_client = app_client
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The bearer token, once logged in."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra or {})
        return headers

    def get(self, path: str, params: dict | None = None, **_: Any) -> AppResponse:
        """GET a path."""
        return AppResponse(self.app_client.get(path, query_string=params or {}, headers=self.headers()))

    def post(self, path: str, body: Any = None, **kw: Any) -> AppResponse:
        """POST a JSON body (or raw `data=`) to a path."""
        headers = self.headers(kw.get("headers"))
        if "data" in kw:
            return AppResponse(self.app_client.post(path, data=kw["data"], headers=headers))
        return AppResponse(self.app_client.post(path, json=body, headers=headers))


def worker_pid(master_pid: int) -> int:
    """The pid of a gunicorn master's (single) worker process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master_pid:
            return int(stat.parent.name)
    raise AssertionError("no gunicorn worker found")


class DbLock:
    """Another connection holding a write lock on a table (SQLite: the whole file) until the block ends."""

    def __init__(self, db_url: str, table: str) -> None:
        self.db_url = db_url
        self.table = table

    def __enter__(self) -> DbLock:
        if self.db_url.startswith("sqlite:///"):
            import sqlite3

            self.conn = sqlite3.connect(self.db_url[len("sqlite:///") :], isolation_level=None, timeout=10)
            self.conn.execute("BEGIN EXCLUSIVE")
        else:
            from urllib.parse import urlsplit

            import pymysql

            parts = urlsplit(self.db_url)
            self.conn = pymysql.connect(
                host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                password=parts.password or "", database=parts.path.lstrip("/"),
            )  # fmt: skip
            with self.conn.cursor() as cur:
                cur.execute(f"LOCK TABLES {self.table} WRITE")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.db_url.startswith("sqlite:///"):
            self.conn.execute("ROLLBACK")
        else:
            with self.conn.cursor() as cur:
                cur.execute("UNLOCK TABLES")
        self.conn.close()
