"""Nothing lost, nobody locked out: killed instances, database blinks, clears and deletions mid-stream,
upstreams that never stop, heartbeats, and a request's total database wait (real processes, both backends)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import chat_env
from tests.helpers import (
    Client,
    DbLock,
    assert_error,
    frame_text,
    history,
    query,
    read_stream,
    sse_events,
    stream,
    with_redis,
    worker_pid,
)

# Token liveness, limits and throttles: these tests run a third time with Redis holding that state.
pytestmark = pytest.mark.redis_state


def wait_for(predicate, timeout_s: float = 10, step: float = 0.1):
    """Poll until `predicate()` is truthy; return its value (or the last one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def raw_lines(res: requests.Response) -> list[str]:
    """Every line of an SSE body, comments included."""
    return res.content.decode().split("\n")


def test_a_killed_instance_leaves_the_reply_partial_and_frees_the_slot(start_server, db_url, fake_llm, new_user):
    server = start_server(
        "chat",
        **chat_env(
            fake_llm,
            db_url,
            AICHAT_STREAM_LEASE=3,
            AICHAT_REPLY_CHECKPOINT=0.3,
            AICHAT_CHAT_MAX_CONCURRENT_STREAMS=1,
        ),
    )
    client = Client(server.base_url, token=new_user()[1])
    fake_llm.enqueue(chunks=[f"{i}" for i in range(40)], delay=0.1)
    res = stream(client, {"role_code": "naitang", "message": "别走"})
    events = sse_events(res)
    received = ""
    while len(received) < 10:
        received += frame_text([next(events)[1]])
    time.sleep(0.6)  # past a checkpoint
    os.kill(worker_pid(server.proc.pid), signal.SIGKILL)  # an OOM, a crash, FC reclaiming the instance
    res.close()
    # gunicorn starts a new worker; the dead stream's slot is still leased, and Retry-After says for how long.
    refused = wait_for(lambda: _post_ok(client, "/chat/stream", {"role_code": "naitang", "message": "x"}), 10)
    if refused.status_code == 429:
        assert 1 <= int(refused.headers["Retry-After"]) <= 3
    # Within one lease the slot frees by itself.
    fake_llm.enqueue(chunks=["好"])
    again = wait_for(
        lambda: _post_ok(client, "/chat/stream", {"role_code": "naitang", "message": "又来了"}).status_code == 200, 6
    )
    assert again
    stored = history(client)
    killed = stored[1]
    assert stored[0]["content"] == "别走" and killed["sender_role"] == "assistant"
    # What was being written when the instance died shows as partial, not as missing.
    assert killed["is_partial"] is True and killed["content"] and received.startswith(killed["content"][:10])


def _post_ok(client: Client, path: str, body: dict) -> requests.Response:
    try:
        res = client.post(path, body)
    except requests.ConnectionError:  # the worker is being replaced
        time.sleep(0.2)
        res = client.post(path, body)
    return res


@pytest.fixture
def blinking(start_server, db_url, fake_llm):
    """A ChatService whose database waits are short (2 s) and whose replies are saved only at their end."""
    return start_server(
        "chat",
        **chat_env(
            fake_llm,
            db_url,
            AICHAT_DB_CONNECT_TIMEOUT=2,
            AICHAT_DB_READ_TIMEOUT=2,
            AICHAT_REPLY_CHECKPOINT=100,
            AICHAT_STREAM_LEASE=6,
            AICHAT_SSE_HEARTBEAT=1,
        ),
    )


def test_a_database_blink_at_the_end_of_a_reply_loses_nothing(blinking, db_url, fake_llm, new_user):
    client = Client(blinking.base_url, token=new_user()[1])
    fake_llm.enqueue(chunks=["一", "二", "三"], delay=0.3)
    res = stream(client, {"role_code": "naitang", "message": "说完整"})
    lines = iter(res.iter_lines(decode_unicode=True))
    seen = [next(lines)]  # the meta frame: the user message is stored
    with DbLock(db_url, "messages"):
        time.sleep(6)  # the reply finishes meanwhile; its save fails and is retried, with heartbeats
    seen += list(lines)
    payloads = [line[6:] for line in seen if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]" and frame_text(payloads) == "一二三"
    done = json.loads(payloads[-2])
    assert done["x_event"]["type"] == "done" and "error" not in done
    assert ": ping" in seen  # the stream stayed open with comment lines while the save was retried
    stored = history(client)
    assert stored[1]["content"] == "一二三" and stored[1]["is_partial"] is False
    assert stored[1]["id"] == done["x_event"]["message_id"]
    # And the stream slot came back: two streams at once are allowed again.
    for _ in range(2):
        fake_llm.enqueue(chunks=["a"], delay=0.5)
    with ThreadPoolExecutor(2) as pool:
        statuses = list(
            pool.map(
                lambda i: _post_ok(client, "/chat/stream", {"role_code": "naitang", "message": f"{i}"}).status_code,
                range(2),
            )
        )
    assert statuses == [200, 200]


def test_past_the_save_window_the_reply_is_spooled_then_stored(start_server, db_url, fake_llm, new_user, tmp_path):
    server = start_server(
        "chat",
        **chat_env(
            fake_llm,
            db_url,
            AICHAT_DB_CONNECT_TIMEOUT=2,
            AICHAT_DB_READ_TIMEOUT=2,
            AICHAT_REPLY_CHECKPOINT=100,
            AICHAT_REPLY_SAVE_WINDOW=1,
            AICHAT_SPOOL_DIR=tmp_path / "spool",
        ),
    )
    client = Client(server.base_url, token=new_user()[1])
    fake_llm.enqueue(chunks=["存", "下", "来"], delay=0.3)
    res = stream(client, {"role_code": "naitang", "message": "别丢"})
    lines = iter(res.iter_lines(decode_unicode=True))
    seen = [next(lines)]
    with DbLock(db_url, "messages"):
        seen += list(lines)  # the save window (1 s) runs out while the database is locked
        assert list((tmp_path / "spool").glob("*.json"))  # kept on the instance's disk
    payloads = [line[6:] for line in seen if line.startswith("data: ")]
    fallback = json.loads(payloads[-2])
    assert fallback["error"]["code"] == "DatabaseError" and frame_text(payloads) == "存下来"
    # When the database is back, the spool writes it (the drainer retries every few seconds).
    stored = wait_for(lambda: [m for m in history(client) if m["sender_role"] == "assistant"], 20, 0.5)
    assert [(m["content"], m["is_partial"]) for m in stored] == [("存下来", False)]
    assert wait_for(lambda: not list((tmp_path / "spool").glob("*.json")), 5)


class TestRemovedMidStream:
    def test_clear_wins(self, user, fake_llm, db_url):
        for _ in range(2):
            fake_llm.enqueue(chunks=["慢", "慢", "说", "完"], delay=0.4)
        running = [stream(user, {"role_code": "naitang", "message": f"第{i}条"}) for i in range(2)]
        readers = [sse_events(res) for res in running]
        for reader in readers:
            next(reader)
        assert user.post("/chat/clear", {"role_code": "naitang"}).json()["deleted_count"] >= 2
        for reader in readers:
            payloads = [p for _, p in reader]
            assert payloads[-1] == "[DONE]"  # the client still gets its text
        time.sleep(0.3)
        assert history(user) == []  # no reply outlives the message it answered

    def test_deleting_the_message_or_the_conversation(self, user, fake_llm):
        made = user.post("/chat/conversations", {"role_code": "naitang"}).json()["conversation"]
        target = {"conversation_id": made["conversation_id"]}
        fake_llm.enqueue(chunks=["一", "二", "三"], delay=0.4)
        res = stream(user, {**target, "message": "这条会被删"})
        reader = sse_events(res)
        meta = json.loads(next(reader)[1])["x_event"]
        assert user.post("/chat/message/delete", {"message_id": meta["message_id"]}).status_code == 200
        assert [p for _, p in reader][-1] == "[DONE]"
        assert user.get("/chat/history", params=target).json()["messages"] == []
        fake_llm.enqueue(chunks=["一", "二", "三"], delay=0.4)
        res = stream(user, {**target, "message": "整个会话都删"})
        reader = sse_events(res)
        next(reader)
        assert user.post("/chat/conversation/delete", target).status_code == 200
        assert [p for _, p in reader][-1] == "[DONE]"
        assert_error(user.get("/chat/history", params=target), 404, "ConversationNotFound")


class TestBounds:
    def test_a_reply_that_never_stops_is_cut_by_time(self, start_server, db_url, fake_llm, new_user):
        server = start_server("chat", **chat_env(fake_llm, db_url, AICHAT_REPLY_MAX_SECONDS=1.5))
        client = Client(server.base_url, token=new_user()[1])
        fake_llm.enqueue(chunks=["喵"] * 2000, delay=0.02)  # 40 s of frames at 50/s
        started = time.monotonic()
        payloads = read_stream(stream(client, {"role_code": "naitang", "message": "一直说"}))
        assert time.monotonic() - started < 5
        done = json.loads(payloads[-2])
        assert payloads[-1] == "[DONE]" and done["x_event"]["finish_reason"] == "length"
        stored = history(client)[1]
        assert stored["content"] == frame_text(payloads) and stored["is_partial"] is False  # complete, not partial

    def test_a_reply_is_cut_by_length(self, start_server, db_url, fake_llm, new_user):
        server = start_server("chat", **chat_env(fake_llm, db_url, AICHAT_REPLY_MAX_CHARS=5))
        client = Client(server.base_url, token=new_user()[1])
        fake_llm.enqueue(chunks=["一二", "三四", "五六", "七八", "九十"])
        payloads = read_stream(stream(client, {"role_code": "naitang", "message": "数数"}))
        assert (
            frame_text(payloads) == "一二三四五六"
            and json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
        )
        assert history(client)[1]["content"] == "一二三四五六"


def test_heartbeats_while_the_upstream_is_silent(start_server, db_url, fake_llm, new_user):
    server = start_server("chat", **chat_env(fake_llm, db_url, AICHAT_SSE_HEARTBEAT=0.5))
    client = Client(server.base_url, token=new_user()[1])
    fake_llm.enqueue(chunks=["想", "好了"], delay=2.5)  # a thinking pause before each frame
    res = stream(client, {"role_code": "naitang", "message": "慢慢想"})
    lines = raw_lines(res)
    assert lines.count(": ping") >= 6
    payloads = [line[6:] for line in lines if line.startswith("data: ")]
    assert frame_text(payloads) == "想好了" and payloads[-1] == "[DONE]"  # the naive client's text is unchanged


def test_pings_arrive_during_a_40_second_silence_at_the_default_heartbeat(chat_server, db_url, new_user, fake_llm):
    # The service's default AICHAT_SSE_HEARTBEAT (15 s): a thinking model silent for 40 s gets two comment
    # lines, timed by the heartbeat, and a naive client's text is exactly the reply. One backend is enough.
    if not db_url.startswith("sqlite") or with_redis(db_url):
        pytest.skip("not about the database: run once")
    client = Client(chat_server.base_url, token=new_user()[1])
    fake_llm.enqueue(chunks=["想", "好了"], headers_then_delay=40)
    began = time.monotonic()
    res = stream(client, {"role_code": "naitang", "message": "想很久"})
    pings = []
    payloads = []
    for line in res.iter_lines(decode_unicode=True):
        if line == ": ping":
            pings.append(time.monotonic() - began)
        elif line.startswith("data: "):
            payloads.append(line[6:])
    assert len(pings) == 2 and 14 <= pings[0] <= 17 and 29 <= pings[1] <= 32, pings
    assert frame_text(payloads) == "想好了" and payloads[-1] == "[DONE]"


def test_a_half_closed_client_still_gets_its_whole_reply(chat_server, new_user, fake_llm):
    import socket

    token = new_user()[1]
    fake_llm.enqueue(chunks=["半", "关", "也", "行"], delay=0.3)
    body = json.dumps({"role_code": "naitang", "message": "半关闭"}).encode()
    head = (
        f"POST /chat/stream HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", chat_server.port), timeout=10) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)  # legal HTTP: the request is complete
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    text = answer.decode()
    assert "data: [DONE]" in text and "半" in text and "行" in text


def test_a_requests_database_wait_is_bounded_in_all(start_server, db_url, fake_dysms, new_user):
    from tests.conftest import dysms_env

    server = start_server(
        "login", AICHAT_DB_URL=db_url, AICHAT_DB_REQUEST_BUDGET=3, AICHAT_DB_READ_TIMEOUT=10, **dysms_env(fake_dysms)
    )
    _, token = new_user()
    client = Client(server.base_url, token=token)
    # MySQL: a lock on users blocks both of /me's reads (token liveness, then the profile). SQLite's readers
    # never wait in WAL mode, so there the write of /logout waits.
    path, method = ("/me", "get") if db_url.startswith("mysql") else ("/logout", "post")
    with DbLock(db_url, "users"):
        started = time.monotonic()
        res = getattr(client, method)(path)
        elapsed = time.monotonic() - started
    assert_error(res, 500, "DatabaseError")
    assert elapsed < 4.5, elapsed  # one budget of 3 s, not a 10 s wait per statement
    assert query(db_url, "SELECT COUNT(*) FROM users")[0][0] >= 1


def test_a_running_stream_keeps_its_slot_past_the_lease(start_server, db_url, fake_llm, new_user):
    # The lease is short (2 s) but renewed by the running process: a stream that lasts longer still holds
    # its slot, and a second one is refused, with Retry-After the real time left on the lease.
    server = start_server(
        "chat", **chat_env(fake_llm, db_url, AICHAT_STREAM_LEASE=6, AICHAT_CHAT_MAX_CONCURRENT_STREAMS=1)
    )
    client = Client(server.base_url, token=new_user()[1])
    fake_llm.enqueue(chunks=[f"{i}" for i in range(16)], delay=0.5)  # 8 s, longer than the lease
    res = stream(client, {"role_code": "naitang", "message": "长长的回答"})
    events = sse_events(res)
    next(events)
    refused = client.post("/chat/stream", {"role_code": "naitang", "message": "插队"})
    assert_error(refused, 429, "RateLimited")
    assert 4 <= int(refused.headers["Retry-After"]) <= 6  # the lease's time left, not a constant
    time.sleep(7)  # past the first lease: only its renewal keeps the slot taken
    assert_error(client.post("/chat/stream", {"role_code": "naitang", "message": "还插队"}), 429, "RateLimited")
    assert [p for _, p in events][-1] == "[DONE]"
