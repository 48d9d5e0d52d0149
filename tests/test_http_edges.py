"""Hostile and malformed HTTP from raw sockets: every answer is the contract's JSON error with a 4xx status."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from tests.helpers import Client, assert_error


def raw(server, data: bytes, *, timeout: float = 10, half_close: bool = False) -> tuple[int, dict, bytes]:
    """Send bytes as they are, read the whole answer; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                headers = parse_headers(head)
                length = headers.get("content-length")
                if length is not None and len(body) >= int(length):
                    break
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, parse_headers(head), body


def parse_headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


def assert_json_error(answer: tuple[int, dict, bytes], status: int, code: str = "InvalidInput") -> dict:
    got_status, headers, body = answer
    assert got_status == status, (got_status, body[:200])
    assert headers["content-type"] == "application/json; charset=utf-8", headers
    decoded = json.loads(body)
    assert decoded["success"] is False and decoded["code"] == code and decoded["message"]
    assert b"<html" not in body.lower()
    return decoded


LOGIN_BODY = b'{"phone_number":"10086","verify_code":"1234"}'


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /chat/history?role_code=" + b"x" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 65536 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: \x00\x01bin\r\n\r\n", 400),
        (b"POST /login HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST /login HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef", 400),
        (
            b"POST /login HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /login HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}", 417),
        (b"GET /health\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
    ],
    ids=[
        "long request line",
        "64 KB header",
        "150 headers",
        "obsolete folding",
        "binary header",
        "bad content-length",
        "two content-lengths",
        "te and cl",
        "unknown expect",
        "http/0.9",
        "http/2.0 line",
        "garbage",
    ],
)
def test_requests_gunicorn_refuses_get_the_contract_error(login_server, request_bytes, status):
    answer = assert_json_error(raw(login_server, request_bytes), status)
    assert answer["code"] == "InvalidInput"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # not hex
        b"-5\r\n{}\r\n0\r\n\r\n",  # negative
        b"2;bad\x00ext\r\n{}\r\n0\r\n\r\n",  # a bad chunk extension
        b"2\r\n{}",  # unterminated: the client stops (half-closes) inside the body
    ],
    ids=["not hex", "negative", "bad extension", "unterminated"],
)
def test_a_malformed_chunked_body_is_the_clients_mistake(login_server, body):
    head = b"POST /login HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert_json_error(raw(login_server, head + body, half_close=True), 400)


def test_a_body_shorter_than_its_length_changes_nothing(login_server, chat_server, new_user, fake_llm):
    # The client half-closes after sending part of what it announced.
    head = b"POST /login HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    assert_json_error(raw(login_server, head + LOGIN_BODY, half_close=True), 400)
    _, token = new_user()
    Client(chat_server.base_url, token=token).post("/chat/stream", {"role_code": "naitang", "message": "在吗"}).close()
    body = b'{"role_code":"naitang"}'
    head = (
        b"POST /chat/clear HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nContent-Length: 100\r\n\r\n"
    )
    assert_json_error(raw(chat_server, head + body, half_close=True), 400)
    history = Client(chat_server.base_url, token=token).get("/chat/history", params={"role_code": "naitang"})
    assert len(history.json()["messages"]) == 2  # the clear was not carried out


def test_a_complete_request_then_half_close_is_served(login_server):
    head = b"POST /login HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nConnection: close\r\n"
    answer = raw(login_server, head + b"Content-Length: %d\r\n\r\n" % len(LOGIN_BODY) + LOGIN_BODY, half_close=True)
    assert answer[0] == 200 and json.loads(answer[2])["access_token"]


class TestContentTypes:
    @pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
    def test_send_code_and_login_take_json_only(self, login, content_type):
        headers = {"Content-Type": content_type} if content_type else {}
        for path in ("/send_code", "/login"):
            res = login.post(path, data=LOGIN_BODY, headers=headers)
            if content_type is None:  # requests sends none for bytes
                assert "Content-Type" not in res.request.headers
            assert_error(res, 415, "UnsupportedMediaType")
        ok = login.post("/login", data=LOGIN_BODY, headers={"Content-Type": "application/json; charset=utf-8"})
        assert ok.status_code == 200

    def test_bearer_operations_keep_accepting_curls_default(self, user, fake_llm):
        # `curl -d '{...}'` sends a form type; an Authorization header already forces a preflight.
        res = user.post(
            "/chat/clear",
            data=b'{"role_code":"naitang"}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert res.status_code == 200 and res.json()["success"] is True


class TestHeaders:
    def test_security_headers(self, login, user):
        health = login.get("/health")
        assert health.headers["X-Content-Type-Options"] == "nosniff"
        assert "no-store" not in health.headers.get("Cache-Control", "")
        token = login.post("/login", {"phone_number": "10086", "verify_code": "1234"})
        assert token.headers["Cache-Control"] == "no-store"
        mine = user.get("/chat/history", params={"role_code": "naitang"})
        assert mine.headers["Cache-Control"] == "no-store" and mine.headers["X-Content-Type-Options"] == "nosniff"
        error = user.get("/chat/history")
        assert error.headers["X-Content-Type-Options"] == "nosniff"
        # A streamed operation's JSON error is a user's answer too.
        refused = user.post("/chat/stream", {"role_code": "naitang"})
        assert refused.status_code == 400 and refused.headers["Cache-Control"] == "no-store"

    def test_preflight_has_no_html_type(self, login_server):
        res = requests.options(
            login_server.base_url + "/login",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            timeout=5,
        )
        assert res.status_code == 204 and "Content-Type" not in res.headers

    def test_vary_origin_with_an_allow_list(self, start_server, sqlite_url):
        server = start_server("login", AICHAT_DB_URL=sqlite_url, AICHAT_CORS_ORIGINS="https://app.example")
        for origin in ("https://app.example", "https://evil.example", None):
            headers = {"Origin": origin} if origin else {}
            res = requests.get(server.base_url + "/health", headers=headers, timeout=5)
            assert "Origin" in res.headers["Vary"], origin
            assert res.headers.get("Access-Control-Allow-Origin") == (
                "https://app.example" if origin == "https://app.example" else None
            )

    def test_a_request_id_is_capped(self, login):
        good = login.get("/health", headers={"x-fc-request-id": "req-1234"})
        assert good.headers["X-Request-Id"] == "req-1234"
        for hostile in ("x" * 500, "a\tb", "中文"):
            echoed = login.get("/health", headers={"x-fc-request-id": hostile.encode("utf-8").decode("latin-1")})
            assert echoed.headers["X-Request-Id"] != hostile and len(echoed.headers["X-Request-Id"]) <= 64


class TestLifecycleHooks:
    def test_only_fc_reaches_them(self, login_server, chat_server):
        for server in (login_server, chat_server):
            assert_error(requests.post(server.base_url + "/initialize", timeout=5), 404, "NotFound")
            assert_error(requests.get(server.base_url + "/pre-stop", timeout=5), 404, "NotFound")
            spoofed = requests.post(
                server.base_url + "/initialize", headers={"x-fc-control-path": "/pre-stop"}, timeout=5
            )
            assert_error(spoofed, 404, "NotFound")
            ok = requests.post(
                server.base_url + "/initialize", headers={"x-fc-control-path": "/initialize"}, timeout=30
            )
            assert ok.status_code == 200
            ok = requests.get(server.base_url + "/pre-stop", headers={"x-fc-control-path": "/pre-stop"}, timeout=30)
            assert ok.status_code == 200


class TestClientIp:
    def test_the_sms_cap_counts_the_address_fc_appended(self, start_server, sqlite_url, fake_dysms):
        from tests.conftest import dysms_env
        from tests.helpers import random_phone

        server = start_server(
            "login",
            AICHAT_DB_URL=sqlite_url,
            AICHAT_CODE_MAX_PER_IP_PER_DAY=2,
            AICHAT_CODE_RESEND_COOLDOWN=0,
            **dysms_env(fake_dysms),
        )
        statuses = []
        for i in range(4):
            # The client rotates the first entry; FC's gateway appends the real address last.
            headers = {"X-Forwarded-For": f"10.0.0.{i}, 203.0.113.9"}
            res = requests.post(
                server.base_url + "/send_code", json={"phone_number": random_phone()}, headers=headers, timeout=10
            )
            statuses.append(res.status_code)
        assert statuses == [200, 200, 429, 429]

    def test_fc_client_ip_header_wins(self, start_server, sqlite_url, fake_dysms):
        from tests.conftest import dysms_env
        from tests.helpers import random_phone

        server = start_server(
            "login",
            AICHAT_DB_URL=sqlite_url,
            AICHAT_CODE_MAX_PER_IP_PER_DAY=1,
            AICHAT_CODE_RESEND_COOLDOWN=0,
            **dysms_env(fake_dysms),
        )
        statuses = []
        for i in range(2):
            headers = {"X-Forwarded-For": f"198.51.100.{i}", "x-fc-client-ip": "203.0.113.77"}
            res = requests.post(
                server.base_url + "/send_code", json={"phone_number": random_phone()}, headers=headers, timeout=10
            )
            statuses.append(res.status_code)
        assert statuses == [200, 429]


def test_slow_clients_cannot_starve_the_others(start_server, sqlite_url):
    # 40 connections that dribble their headers one byte per second: every other request is still served
    # at once, and the dribblers are cut (408, the contract's JSON) after the header timeout.
    server = start_server("login", AICHAT_DB_URL=sqlite_url, AICHAT_THREADS=8, AICHAT_HEADER_TIMEOUT=3)
    stop = threading.Event()
    answers: list[bytes] = []

    def dribble() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            try:
                for byte in b"GET /health HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"x" * 100:
                    if stop.is_set():
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(1)
            except OSError:
                pass
            try:
                answers.append(sock.recv(4096))
            except OSError:
                answers.append(b"")

    threads = [threading.Thread(target=dribble, daemon=True) for _ in range(40)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    try:
        for _ in range(5):
            started = time.monotonic()
            assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - started < 1.0
    finally:
        time.sleep(4)  # past the header timeout
        stop.set()
        for thread in threads:
            thread.join(5)
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) >= 30, answers[:3]
    assert b'"code":"InvalidInput"' in timed_out[0]


class _Socket:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def _response(request: bytes):
    from aichat.gunicorn_worker import SizedResponse
    from gunicorn.config import Config
    from gunicorn.http.parser import RequestParser

    cfg = Config()
    req = next(iter(RequestParser(cfg, iter([request]), ("127.0.0.1", 1))))
    sock = _Socket()
    return SizedResponse(req, sock, cfg), sock


def test_a_sized_answer_goes_in_one_write_and_a_stream_sends_its_head_at_once():
    resp, sock = _response(b"GET /chat/roles HTTP/1.1\r\nHost: x\r\n\r\n")
    resp.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    resp.write(b"{}")
    resp.close()
    assert len(sock.writes) == 1 and sock.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sock.writes[0].endswith(b"\r\n\r\n{}")
    # No body (a 304, a HEAD): the head still goes, when the response closes.
    resp, sock = _response(b"HEAD /chat/roles HTTP/1.1\r\nHost: x\r\n\r\n")
    resp.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    resp.close()
    assert len(sock.writes) == 1 and sock.writes[0].endswith(b"\r\n\r\n")
    # A stream (no Content-Length): its head is sent before any frame is ready.
    resp, sock = _response(b"POST /chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    resp.start_response("200 OK", [("Content-Type", "text/event-stream")])
    resp.send_headers()
    assert len(sock.writes) == 1 and b"Transfer-Encoding: chunked" in sock.writes[0]
