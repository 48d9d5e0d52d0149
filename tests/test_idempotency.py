"""A retried send is not a second message: idempotency keys on the turn operations, over real HTTP."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.helpers import AppClient, Client, assert_error, history, post_stream, query, read_stream

NODE = shutil.which("node")
FES = Path(__file__).resolve().parent.parent / ".tools" / "node_modules" / "@microsoft" / "fetch-event-source"
RETRY_JS = Path(__file__).parent / "js" / "fetch_event_source_retry.mjs"


def key() -> str:
    return "k_" + secrets.token_hex(8)


def streamed(client: Client, body: dict, *, path: str = "/chat/stream", headers: dict | None = None):
    res = client.post(path, body, stream=True, headers=headers)
    if res.status_code != 200:
        return res.status_code, res, None
    payloads = read_stream(res)
    frames = [json.loads(p) for p in payloads if p != "[DONE]"]
    assert payloads[-1] == "[DONE]"
    return 200, frames, "".join(f["choices"][0]["delta"]["content"] for f in frames)


def done_event(frames: list[dict]) -> dict:
    return next(f["x_event"] for f in frames if f.get("x_event", {}).get("type") == "done")


def test_a_repeat_after_the_reply_is_its_stored_outcome(user, fake_llm):
    fake_llm.enqueue(chunks=["你", "好", "呀"], usage={"prompt_tokens": 9, "completion_tokens": 3})
    k = key()
    status, first, text = streamed(user, {"role_code": "naitang", "message": "在吗"}, headers={"Idempotency-Key": k})
    assert status == 200 and text == "你好呀"
    for _ in range(2):
        status, again, again_text = streamed(
            user, {"role_code": "naitang", "message": "在吗"}, headers={"Idempotency-Key": k}
        )
        assert status == 200 and again_text == text
        assert done_event(again)["message_id"] == done_event(first)["message_id"]
        assert again[0]["x_event"]["message_id"] == first[0]["x_event"]["message_id"]  # the same user message
        assert again[0]["x_event"]["replayed"] is True
        assert done_event(again)["usage"]["prompt_tokens"] == 9
    assert len(fake_llm.requests) == 1  # no second completion
    assert [m["sender_role"] for m in history(user)] == ["user", "assistant"]


def test_the_key_may_come_in_the_body(user, fake_llm):
    k = key()
    body = {"role_code": "naitang", "message": "正文里的键", "client_message_id": k}
    streamed(user, body)
    streamed(user, body)
    assert len(fake_llm.requests) == 1 and len(history(user)) == 2
    # The header and the body may not disagree; a malformed key is refused before anything runs.
    assert_error(user.post("/chat/stream", body, headers={"Idempotency-Key": key()}), 400, "InvalidInput")
    for bad in ("has space", "x" * 65, "", "a/b"):
        assert_error(
            user.post("/chat/stream", {"role_code": "naitang", "message": "x"}, headers={"Idempotency-Key": bad}),
            400,
            "InvalidInput",
        )
    for bad in (5, ["a"], {"a": 1}, "键"):
        assert_error(
            user.post("/chat/stream", {"role_code": "naitang", "message": "x", "client_message_id": bad}),
            400,
            "InvalidInput",
        )
    assert len(history(user)) == 2


def test_send_answers_the_same_json(user, fake_llm):
    k = key()
    first = user.post("/chat/send", {"role_code": "naitang", "message": "一次"}, headers={"Idempotency-Key": k})
    again = user.post("/chat/send", {"role_code": "naitang", "message": "一次"}, headers={"Idempotency-Key": k})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and len(fake_llm.requests) == 1


def test_a_repeat_while_the_first_streams_is_409(user, fake_llm):
    fake_llm.enqueue(chunks=["慢", "慢", "说"], delay=0.6)
    k = key()
    body = {"role_code": "naitang", "message": "慢一点"}
    res = user.post("/chat/stream", body, stream=True, headers={"Idempotency-Key": k})
    lines = res.iter_lines()
    next(lines)  # the first frame arrived: the turn runs
    repeat = user.post("/chat/stream", body, headers={"Idempotency-Key": k})
    assert_error(repeat, 409, "RequestInProgress")
    assert int(repeat.headers["Retry-After"]) >= 1
    list(lines)
    assert len(fake_llm.requests) == 1 and len(history(user)) == 2


def test_another_body_under_a_used_key_is_422(user, fake_llm):
    k = key()
    streamed(user, {"role_code": "naitang", "message": "第一句"}, headers={"Idempotency-Key": k})
    res = user.post("/chat/stream", {"role_code": "naitang", "message": "第二句"}, headers={"Idempotency-Key": k})
    assert_error(res, 422, "IdempotencyKeyReused")
    assert len(history(user)) == 2


def test_concurrent_first_requests_run_once(user, fake_llm):
    fake_llm.enqueue(chunks=["只", "回", "一次"], headers_then_delay=0.5)
    k = key()
    results: list = []

    def go() -> None:
        results.append(streamed(user, {"role_code": "naitang", "message": "同时"}, headers={"Idempotency-Key": k}))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 409]
    assert len(fake_llm.requests) == 1 and [m["sender_role"] for m in history(user)] == ["user", "assistant"]


def test_keys_belong_to_their_user(chat_server, new_user, fake_llm):
    k = key()
    alice, bob = (Client(chat_server.base_url, token=new_user()[1]) for _ in range(2))
    for client in (alice, bob):
        status, _, _ = streamed(client, {"role_code": "naitang", "message": "同一个键"}, headers={"Idempotency-Key": k})
        assert status == 200
    assert len(fake_llm.requests) == 2 and len(history(alice)) == len(history(bob)) == 2


def test_a_refusal_before_the_first_frame_is_answered_again_without_a_second_message(user, fake_llm):
    fake_llm.enqueue(status=500)
    k = key()
    body = {"role_code": "naitang", "message": "上游坏了"}
    first = user.post("/chat/stream", body, headers={"Idempotency-Key": k})
    assert_error(first, 502, "UpstreamHTTPError")
    again = user.post("/chat/stream", body, headers={"Idempotency-Key": k})
    assert again.status_code == 502 and again.json() == first.json()
    assert len(fake_llm.requests) == 1 and [m["sender_role"] for m in history(user)] == ["user"]


def test_regenerate_edit_and_skill_take_keys(user, fake_llm):
    streamed(user, {"role_code": "naitang", "message": "先说一句"})
    for path, body in (
        ("/chat/regenerate", {"role_code": "naitang"}),
        ("/chat/edit", {"role_code": "naitang", "message": "改一下"}),
        ("/chat/skill", {"role_code": "naitang", "skill_code": "clock"}),
    ):
        k = key()
        before = len(fake_llm.requests)
        status, _, text = streamed(user, body, path=path, headers={"Idempotency-Key": k})
        assert status == 200
        ran = len(fake_llm.requests) - before
        status, _, again = streamed(user, body, path=path, headers={"Idempotency-Key": k})
        assert status == 200 and again == text and len(fake_llm.requests) - before == ran, path


def test_keys_expire(chat_app, fake_llm, new_user):
    client = AppClient(chat_app(idempotency_ttl_s=1), token=new_user()[1])
    k = key()
    body = {"role_code": "naitang", "message": "过期", "client_message_id": k}
    post_stream(client.app_client, "/chat/stream", body, client.token)
    post_stream(client.app_client, "/chat/stream", body, client.token)
    assert len(fake_llm.requests) == 1
    time.sleep(1.1)
    post_stream(client.app_client, "/chat/stream", body, client.token)
    assert len(fake_llm.requests) == 2  # a day later (here: a second) it is a new request


def test_account_deletion_erases_the_keys(user, login_server, db_url):
    uid = user.get("/chat/conversations").json()  # a call to learn nothing but that the token works
    del uid
    streamed(user, {"role_code": "naitang", "message": "删号", "client_message_id": key()})
    me = Client(login_server.base_url, token=user.token).get("/me").json()["user"]["uid"]
    assert query(db_url, "SELECT COUNT(*) FROM idempotency_keys WHERE uid = ?", (me,)) == [(1,)]
    assert Client(login_server.base_url, token=user.token).post("/account/delete", {}).status_code == 200
    assert query(db_url, "SELECT COUNT(*) FROM idempotency_keys WHERE uid = ?", (me,)) == [(0,)]


def test_a_retrying_sse_library_stores_one_message(user, fake_llm):
    if NODE is None or not FES.exists():
        if IN_CI:
            pytest.fail("node and @microsoft/fetch-event-source (make tools) are required in CI")
        pytest.skip("node or @microsoft/fetch-event-source is not installed (make tools)")
    fake_llm.enqueue(status=500)  # the first attempt is a 502: the library retries it, again and again
    body = json.dumps({"role_code": "naitang", "message": "重试的库"}, ensure_ascii=False)
    result = subprocess.run(
        [NODE, str(RETRY_JS), str(FES), user.base_url + "/chat/stream", user.token, body, key(), "4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["attempts"] == 4 and answer["statuses"] == [502] * 4
    assert len(fake_llm.requests) == 1 and [m["sender_role"] for m in history(user)] == ["user"]
    # And a stream that completed: the library "reconnects" after it closes; each repeat is the same reply.
    fake_llm.enqueue(chunks=["只", "存", "一次"])
    body = json.dumps({"role_code": "naitang", "message": "再来"}, ensure_ascii=False)
    result = subprocess.run(
        [NODE, str(RETRY_JS), str(FES), user.base_url + "/chat/stream", user.token, body, key(), "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    answer = json.loads(result.stdout)
    assert answer["statuses"] == [200] * 3 and answer["texts"] == ["只存一次"] * 3
    assert len(fake_llm.requests) == 2 and len(history(user)) == 3


def test_a_send_whose_answer_was_not_recorded_is_rebuilt_from_the_stored_reply(user, fake_llm, db_url):
    from tests.test_accounts import execute

    k = key()
    fake_llm.enqueue(chunks=["存", "好了"], usage={"prompt_tokens": 5, "completion_tokens": 2})
    first = user.post("/chat/send", {"role_code": "naitang", "message": "重建"}, headers={"Idempotency-Key": k}).json()
    execute(db_url, "UPDATE idempotency_keys SET response = NULL WHERE idem_key = ?", (k,))  # as if lost
    again = user.post("/chat/send", {"role_code": "naitang", "message": "重建"}, headers={"Idempotency-Key": k}).json()
    for name in ("id", "sender_role", "content", "has_image", "is_partial", "created_at"):
        assert again["message"][name] == first["message"][name], name
    assert again["message"]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert again["user_message_id"] == first["user_message_id"] and len(fake_llm.requests) == 1
