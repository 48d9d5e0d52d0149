"""Redis for the hot path (AICHAT_REDIS_URL): token liveness, chat limits and stream slots, and what
happens when Redis is down or hangs. Required in CI (the machine's Redis, database 15, flushed per run)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI, REDIS_URL, chat_env
from tests.helpers import Client, assert_error, free_port, query, read_stream, stream


@pytest.fixture(scope="session")
def redis_chat(start_server, db_url, fake_llm_server, redis_url):
    env = chat_env(
        fake_llm_server,
        db_url,
        AICHAT_REDIS_URL=redis_url,
        AICHAT_CHAT_MESSAGES_PER_MINUTE=3,
        AICHAT_CHAT_MAX_CONCURRENT_STREAMS=1,
        AICHAT_STREAM_LEASE=3,
    )
    return start_server("chat", **env), start_server("chat", **env)


def uid_of(login_server, token: str) -> str:
    return Client(login_server.base_url, token=token).get("/me").json()["user"]["uid"]


def test_chat_limits_live_in_redis_and_hold_across_instances(redis_chat, new_user, fake_llm, login_server, rdb, db_url):
    one, two = redis_chat
    token = new_user()[1]
    uid = uid_of(login_server, token)
    for server in (one, two, one):
        res = stream(Client(server.base_url, token=token), {"role_code": "naitang", "message": "hi"})
        assert res.status_code == 200
        read_stream(res)
    refused = Client(two.base_url, token=token).post("/chat/stream", {"role_code": "naitang", "message": "4"})
    assert_error(refused, 429, "RateLimited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    events = f"aichat:chat:events:{uid}"
    assert rdb.zcard(events) == 3 and 0 < rdb.pttl(events) <= 60_000  # every key expires by itself
    assert rdb.zcard(f"aichat:chat:slots:{uid}") == 0  # each stream gave its slot back
    assert query(db_url, "SELECT COUNT(*) FROM chat_events WHERE uid = ?", (uid,)) == [(0,)]  # not in the DB


def test_a_stream_holds_its_slot_and_a_dead_instances_slot_expires(redis_chat, new_user, fake_llm, login_server, rdb):
    one, two = redis_chat
    token = new_user()[1]
    uid = uid_of(login_server, token)
    fake_llm.enqueue(chunks=["慢", "慢", "说"], delay=0.5)
    slow = stream(Client(one.base_url, token=token), {"role_code": "naitang", "message": "慢"})
    lines = slow.iter_lines()
    next(lines)
    busy = Client(two.base_url, token=token).post("/chat/stream", {"role_code": "naitang", "message": "同时"})
    assert_error(busy, 429, "RateLimited")
    list(lines)
    # A slot whose instance died: nobody renews it, and it is gone when its lease (3 s) ends.
    rdb.zadd(f"aichat:chat:slots:{uid}", {"dead-instance": int(time.time() * 1000) + 1500})
    assert_error(
        Client(two.base_url, token=token).post("/chat/stream", {"role_code": "naitang", "message": "x"}),
        429,
        "RateLimited",
    )
    time.sleep(1.6)
    res = stream(Client(two.base_url, token=token), {"role_code": "naitang", "message": "又可以了"})
    assert res.status_code == 200
    read_stream(res)


def test_a_revoked_token_is_refused_everywhere_at_once(
    redis_chat, new_user, login_server, start_server, db_url, redis_url, rdb
):
    one, two = redis_chat
    login = start_server("login", AICHAT_DB_URL=db_url, AICHAT_REDIS_URL=redis_url)
    token = new_user()[1]
    for server in (one, two):  # both instances have the token cached as live
        assert Client(server.base_url, token=token).get("/chat/history", params={"role_code": "naitang"}).ok
    uid = uid_of(login_server, token)
    assert Client(login.base_url, token=token).post("/logout", {}).status_code == 200
    # The logout moved the user's generation: the cached answers are stale at once, not after their second.
    assert rdb.pttl(f"aichat:gen:{uid}") > 0
    for server in (one, two):
        res = Client(server.base_url, token=token).get("/chat/history", params={"role_code": "naitang"})
        assert_error(res, 401, "Unauthorized")


def test_a_revocation_while_redis_was_away_still_lands_within_a_second(redis_chat, new_user, login_server, rdb):
    # Logout on an instance without Redis cannot move the generation: the cache's second is the bound.
    one, _ = redis_chat
    token = new_user()[1]
    assert Client(one.base_url, token=token).get("/chat/history", params={"role_code": "naitang"}).ok
    no_redis = Client(login_server.base_url, token=token)
    assert no_redis.post("/logout", {}).status_code == 200
    revoked_at = time.monotonic()
    while Client(one.base_url, token=token).get("/chat/history", params={"role_code": "naitang"}).ok:
        assert time.monotonic() - revoked_at < 1.5, "a revoked token still works after the cache's second"
        time.sleep(0.05)


@pytest.fixture
def hanging_redis() -> Iterator[int]:
    """A server that accepts connections and never answers (a Redis that hangs)."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("kind", ["refused", "hanging"])
def test_redis_down_or_hanging_falls_back_to_the_database(
    start_server, db_url, fake_llm, new_user, login_server, hanging_redis, kind
):
    port = hanging_redis if kind == "hanging" else free_port()
    server = start_server(
        "chat",
        **chat_env(fake_llm, db_url, AICHAT_REDIS_URL=f"redis://127.0.0.1:{port}/0", AICHAT_CHAT_MESSAGES_PER_MINUTE=2),
    )
    token = new_user()[1]
    uid = uid_of(login_server, token)
    client = Client(server.base_url, token=token)
    for _ in range(2):
        began = time.monotonic()
        res = stream(client, {"role_code": "naitang", "message": "没有 Redis"})
        assert res.status_code == 200 and time.monotonic() - began < 3  # bounded: never a hang
        read_stream(res)
    # The limits still hold (in the database) and say so with the contract's error, not a 500.
    assert_error(client.post("/chat/stream", {"role_code": "naitang", "message": "3"}), 429, "RateLimited")
    assert query(db_url, "SELECT COUNT(*) FROM chat_events WHERE uid = ?", (uid,)) == [(2,)]
    assert client.get("/chat/history", params={"role_code": "naitang"}).status_code == 200  # liveness from the DB


def test_the_breaker_leaves_redis_alone_then_tries_again(monkeypatch):
    from aichat import fastpath

    monkeypatch.setattr(fastpath, "BREAKER_S", 0.3)
    path = fastpath.FastPath(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    with pytest.raises(fastpath.RedisUnavailable):
        path.run(lambda r: r.ping())
    began = time.monotonic()
    with pytest.raises(fastpath.RedisUnavailable):
        path.run(lambda r: r.ping())  # not even tried: the breaker is open
    assert time.monotonic() - began < 0.05
    path.url = REDIS_URL
    path._client = None
    time.sleep(0.35)
    try:
        assert path.run(lambda r: r.ping()) is True  # recovered by itself
    except fastpath.RedisUnavailable:
        if IN_CI:
            raise
        pytest.skip("no local Redis")


def test_password_failures_are_counted_in_redis_across_login_instances(start_server, db_url, redis_url, rdb):
    from tests.test_accounts import password_login, register

    env = {"AICHAT_DB_URL": db_url, "AICHAT_REDIS_URL": redis_url, "AICHAT_PASSWORD_FAIL_PER_ACCOUNT": "3"}
    one, two = start_server("login", **env), start_server("login", **env)
    user = register(Client(one.base_url))
    for server in (one, two, one):
        assert_error(
            password_login(Client(server.base_url), user["username"], "wrong-pass-1"), 401, "InvalidCredentials"
        )
    res = password_login(Client(two.base_url), user["username"])
    assert_error(res, 429, "RateLimited")
    key = f"aichat:pwfail:account:user:{user['username'].casefold()}"
    assert rdb.zcard(key) == 3 and 0 < rdb.pttl(key) <= 900_000
    assert query(
        db_url, "SELECT COUNT(*) FROM login_failures WHERE account_key = ?", (f"user:{user['username'].casefold()}",)
    ) == [(0,)]  # not in the database


def test_password_failures_fall_back_to_the_database_without_redis(start_server, db_url):
    from tests.test_accounts import password_login, register

    server = start_server(
        "login",
        AICHAT_DB_URL=db_url,
        AICHAT_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        AICHAT_PASSWORD_FAIL_PER_ACCOUNT="2",
    )
    user = register(Client(server.base_url))
    for _ in range(2):
        assert_error(
            password_login(Client(server.base_url), user["username"], "wrong-pass-1"), 401, "InvalidCredentials"
        )
    assert_error(password_login(Client(server.base_url), user["username"]), 429, "RateLimited")
    assert password_login(Client(server.base_url), uname_free()).status_code == 401  # others are unaffected


def uname_free() -> str:
    import secrets

    return "nobody_" + secrets.token_hex(4)
