"""ChatService over real HTTP: roles, the streaming relay and its persistence, history and clear."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import jwt
import pytest
import requests
from aichat.chat.context import estimate_tokens, message_tokens
from aichat.chat.tooluse import TOOL_GUIDANCE

from tests.conftest import ROLES_FILE, chat_env
from tests.helpers import (
    JPEG,
    PNG,
    TEST_SECRET,
    AppClient,
    Client,
    assert_error,
    chat_once,
    frame_text,
    free_port,
    history,
    png_header,
    query,
    read_stream,
    sse_events,
    stream,
)

# Token liveness, limits and throttles: these tests run a third time with Redis holding that state.
pytestmark = pytest.mark.redis_state

CONTRACT_NAITANG = {
    "role_code": "naitang",
    "nickname": "奶糖",
    "intro": "一只会撒娇、会贴贴、会蹭蹭人的猫咪系陪伴角色。",
    "avatar_url": "https://zzz-pet.oss-cn-hangzhou.aliyuncs.com/image/chat_avatar_cat.jpg",
    "background_url": "https://zzz-pet.oss-cn-hangzhou.aliyuncs.com/image/chat_bg_cat.jpg",
    "opening_message": "喵呜,我是奶糖,今天也想黏在你身边陪你聊天呀。你想先跟我说说现在的心情,还是让我蹭蹭你再开始?",
}
ROLES = json.loads(Path(ROLES_FILE).read_text(encoding="utf-8"))["roles"]
NAITANG_PROMPT = next(r["system_prompt"] for r in ROLES if r["role_code"] == "naitang")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


class TestRoles:
    def test_lists_public_fields_only(self, chat_server):
        res = requests.get(chat_server.base_url + "/chat/roles", timeout=5)
        assert res.status_code == 200
        assert res.headers["Content-Type"] == "application/json; charset=utf-8"
        body = res.json()
        assert body["success"] is True
        assert body["roles"][0] == CONTRACT_NAITANG
        codes = [role["role_code"] for role in body["roles"]]
        assert codes[:2] == ["naitang", "wanqing"] and len(codes) >= 4
        for role in body["roles"]:
            assert set(role) == set(CONTRACT_NAITANG)
        assert "system_prompt" not in res.text and NAITANG_PROMPT[:20] not in res.text

    def test_order_is_stable(self, chat_server):
        answers = [requests.get(chat_server.base_url + "/chat/roles", timeout=5) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200]
        first, second = (a.json() for a in answers)
        assert first == second and first["success"] is True and first["roles"]


class TestStream:
    def test_relays_frames_and_stores_both_messages(self, user, fake_llm):
        res = stream(user, {"role_code": "naitang", "message": "今天有点累。"})
        assert res.status_code == 200
        assert res.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert res.headers["Cache-Control"].startswith("no-cache")
        assert res.headers["X-Accel-Buffering"] == "no"
        payloads = read_stream(res)
        assert payloads[-1] == "[DONE]"
        frames = [json.loads(p) for p in payloads[:-1]]
        assert all(frame["object"] == "chat.completion.chunk" for frame in frames)
        reply = frame_text(payloads)
        assert "本地替身模型" in reply and "今天有点累" in reply
        # Right after [DONE] the history already holds the reply (the contract's flow refreshes here).
        messages = history(user)
        assert [(m["sender_role"], m["content"], m["is_partial"]) for m in messages] == [
            ("user", "今天有点累。", False),
            ("assistant", reply, False),
        ]
        assert messages[0]["id"] < messages[1]["id"]
        assert all(TIMESTAMP.fullmatch(m["created_at"]) and m["has_image"] is False for m in messages)

    def test_frames_are_forwarded_unchanged(self, user, fake_llm):
        fake_llm.enqueue(chunks=["你", "好", "呀"])
        res = stream(user, {"role_code": "naitang", "message": "hi"})
        raw = res.content.decode()
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        # Our meta frame comes first; then each upstream frame that already follows the client rule is
        # forwarded byte for byte (the fake upstream's own fields: x_sent_at, id).
        assert json.loads(events[0][6:])["x_event"]["type"] == "stream.meta"
        first = json.loads(events[2][6:])
        assert first["choices"][0]["delta"]["content"] == "你" and "x_sent_at" in first
        assert first["id"].startswith("chatcmpl-")

    def test_frames_arrive_incrementally(self, user, fake_llm):
        fake_llm.enqueue(chunks=["一", "二", "三", "四", "五"], delay=0.3)
        start = time.monotonic()
        res = stream(user, {"role_code": "naitang", "message": "数数"})
        arrivals = [(t, p) for t, p in sse_events(res)]
        first_content = next(t for t, p in arrivals if p != "[DONE]" and frame_text([p]))
        # The first frame is in the client's hands long before the upstream sends its last one.
        assert first_content - start < 0.9
        assert arrivals[-1][0] - first_content > 0.9

    def test_upstream_request(self, user, fake_llm, chat_server):
        chat_once(user, {"role_code": "naitang", "message": "第一句"})
        fake_llm.reset()
        chat_once(user, {"role_code": "naitang", "message": "第二句", "temperature": 0.8, "max_tokens": 100})
        (sent,) = fake_llm.requests
        assert sent["headers"]["Authorization"] == "Bearer test-llm-key"
        body = sent["body"]
        assert body["stream"] is True and body["model"] == "qwen-plus"
        assert body["temperature"] == 0.8 and body["max_tokens"] == 100
        messages = body["messages"]
        # The role's prompt, then (奶糖 has skills) the note that tool results are data, not instructions.
        assert messages[0] == {"role": "system", "content": NAITANG_PROMPT + TOOL_GUIDANCE}
        # The opening message the user saw comes first, then the history, then the new turn.
        assert messages[1] == {"role": "assistant", "content": CONTRACT_NAITANG["opening_message"]}
        assert [m["role"] for m in messages[2:]] == ["user", "assistant", "user"]
        assert messages[2]["content"] == "第一句" and messages[-1] == {"role": "user", "content": "第二句"}
        assert body["stream_options"] == {"include_usage": True}
        # The hidden prompt and the user's words never reach the service log.
        log = chat_server.log()
        assert NAITANG_PROMPT[:15] not in log and "第二句" not in log

    def test_legacy_prompt_and_message_wins(self, user, fake_llm):
        chat_once(user, {"role_code": "naitang", "prompt": "旧字段"})
        chat_once(user, {"role_code": "naitang", "prompt": "旧字段2", "message": "新字段"})
        assert fake_llm.requests[0]["body"]["messages"][-1]["content"] == "旧字段"
        assert fake_llm.requests[1]["body"]["messages"][-1]["content"] == "新字段"

    def test_image_is_sent_as_data_url_only_this_turn(self, user, fake_llm):
        b64 = base64.b64encode(PNG).decode()
        # The hint says jpeg; the bytes say png, and the bytes win.
        payloads = chat_once(
            user, {"role_code": "naitang", "message": "看图", "image_base64": b64, "image_mime_type": "image/jpeg"}
        )
        assert payloads[-1] == "[DONE]"
        body = fake_llm.requests[0]["body"]
        assert body["model"] == "qwen-vl-plus"
        assert "enable_thinking" not in body  # the vision model is not a hybrid-thinking one
        turn = body["messages"][-1]
        assert turn["content"] == [
            {"type": "text", "text": "看图"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        ]
        # Image-only, with a data: prefix; the earlier image is not sent again.
        chat_once(
            user, {"role_code": "naitang", "image_base64": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()}
        )
        body = fake_llm.requests[1]["body"]
        images = [m for m in body["messages"] if isinstance(m["content"], list)]
        assert len(images) == 1 and images[0]["content"] == [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()}}
        ]
        stored = history(user)
        assert [(m["sender_role"], m["has_image"]) for m in stored] == [
            ("user", True),
            ("assistant", False),
            ("user", True),
            ("assistant", False),
        ]
        assert stored[2]["content"] == ""

    def test_context_budget_edges(self, chat_app, fake_llm, new_user):
        context = 2000
        client = AppClient(chat_app(context_tokens=context), token=new_user()[1])
        for text in ("一二三四五六", "seven eight nine ten", "甲乙", "😺🐟"):
            fake_llm.enqueue(chunks=["好的"])
            chat_once(client, {"role_code": "naitang", "message": text})
        head = [
            {"role": "system", "content": NAITANG_PROMPT + TOOL_GUIDANCE},
            {"role": "assistant", "content": CONTRACT_NAITANG["opening_message"]},
        ]
        turn = {"role": "user", "content": "最后"}
        fixed = sum(message_tokens(m) for m in (*head, turn))
        for keep in (0, 1, 3, 8):
            for slack, expected in ((0, keep), (1, keep - 1)):
                if expected < 0:
                    continue
                # History is read newest first; the reply's reserve (max_tokens) moves the edge exactly.
                stored = history(client)
                newest = [{"role": m["sender_role"], "content": m["content"]} for m in reversed(stored)]
                cost = sum(message_tokens(m) for m in newest[:keep])
                max_tokens = context - fixed - cost + slack
                fake_llm.reset()
                fake_llm.enqueue(chunks=["嗯"])
                chat_once(client, {"role_code": "naitang", "message": "最后", "max_tokens": max_tokens})
                sent = fake_llm.requests[0]["body"]["messages"]
                assert sent[:2] == head and sent[-1] == turn
                assert sent[2:-1] == list(reversed(newest[:expected])), (keep, slack)

    def test_prompt_and_opening_kept_when_nothing_else_fits(self, chat_app, fake_llm, new_user):
        client = AppClient(chat_app(context_tokens=50), token=new_user()[1])
        chat_once(client, {"role_code": "naitang", "message": "第一句"})
        fake_llm.reset()
        chat_once(client, {"role_code": "naitang", "message": "第二句"})
        sent = fake_llm.requests[0]["body"]["messages"]
        assert [m["role"] for m in sent] == ["system", "assistant", "user"]
        assert sent[0]["content"] == NAITANG_PROMPT + TOOL_GUIDANCE and sent[-1]["content"] == "第二句"

    def test_usage_and_reasoning_are_stored_apart(self, user, fake_llm, db_url):
        fake_llm.enqueue(reasoning="先想一想用户的情绪", chunks=["抱", "抱你"])
        payloads = chat_once(user, {"role_code": "naitang", "message": "我难过"})
        frames = [json.loads(p) for p in payloads[:-1]]
        reasoning = "".join(
            (c.get("delta") or {}).get("reasoning_content") or "" for f in frames for c in f.get("choices") or []
        )
        assert reasoning == "先想一想用户的情绪"  # passed through to the client, in its own field
        assert frame_text(payloads) == "抱抱你"  # never mixed into the content
        usage = next(f["usage"] for f in frames if f.get("usage"))
        assert history(user)[-1]["content"] == "抱抱你"
        (row,) = query(
            db_url,
            "SELECT content, reasoning_content, prompt_tokens, completion_tokens FROM messages"
            " WHERE sender_role = 'assistant' AND content = '抱抱你' ORDER BY id DESC LIMIT 1",
        )
        assert row == ("抱抱你", "先想一想用户的情绪", usage["prompt_tokens"], usage["completion_tokens"])

    def test_emoji_round_trip(self, user, fake_llm):
        fake_llm.enqueue(chunks=["喵", "😺", "🐟"])
        payloads = chat_once(user, {"role_code": "naitang", "message": "给你小鱼干 🐟😺"})
        assert frame_text(payloads) == "喵😺🐟"
        assert [m["content"] for m in history(user)] == ["给你小鱼干 🐟😺", "喵😺🐟"]


class TestUpstreamFailures:
    @pytest.mark.parametrize(
        ("status", "code"), [(401, "UpstreamHTTPError"), (429, "UpstreamHTTPError"), (500, "UpstreamHTTPError")]
    )
    def test_refused_before_streaming(self, user, fake_llm, status, code):
        fake_llm.enqueue(status=status)
        res = user.post("/chat/stream", {"role_code": "naitang", "message": "在吗"})
        body = assert_error(res, 502, code)
        assert str(status) in body["message"]
        # The user's message is kept.
        assert [(m["sender_role"], m["content"]) for m in history(user)] == [("user", "在吗")]

    def test_connection_refused(self, chat_app, fake_llm, new_user):
        client = AppClient(chat_app(llm_base_url=f"http://127.0.0.1:{free_port()}"), token=new_user()[1])
        assert_error(client.post("/chat/stream", {"role_code": "naitang", "message": "x"}), 502, "NetworkError")

    def test_read_timeout_before_first_byte(self, start_server, db_url, fake_llm, new_user):
        server = start_server("chat", **chat_env(fake_llm, db_url, AICHAT_LLM_READ_TIMEOUT="0.5"))
        _, token = new_user()
        client = Client(server.base_url, token=token)
        fake_llm.enqueue(first_byte_delay=3)
        res = client.post("/chat/stream", {"role_code": "naitang", "message": "慢"})
        assert_error(res, 504, "NetworkError")
        assert res.elapsed.total_seconds() < 2.5

    @pytest.mark.parametrize(
        ("script", "code"),
        [
            ({"chunks": ["一", "二", "三", "四"], "drop_after": 2}, "NetworkError"),
            ({"chunks": ["一", "二", "三", "四"], "malformed_after": 2}, "UpstreamHTTPError"),
            ({"chunks": ["一", "二", "三", "四"], "overlong_after": 2}, "UpstreamHTTPError"),
        ],
    )
    def test_mid_stream_failure_sends_fallback_and_keeps_partial(self, user, fake_llm, script, code):
        fake_llm.enqueue(**script)
        payloads = chat_once(user, {"role_code": "naitang", "message": "讲个故事"})
        assert payloads[-1] == "[DONE]"
        fallback = json.loads(payloads[-2])
        assert fallback["error"]["code"] == code and fallback["error"]["message"]
        # The fallback adds no text of its own: what a client concatenated is exactly what history keeps.
        assert fallback["choices"][0]["delta"]["content"] == ""
        assert fallback["x_event"]["type"] == "error" and fallback["x_event"]["code"] == code
        assert frame_text(payloads) == "一二"
        messages = history(user)
        assert (messages[0]["sender_role"], messages[0]["content"]) == ("user", "讲个故事")
        assert messages[1]["sender_role"] == "assistant" and messages[1]["is_partial"] is True
        assert messages[1]["content"] == "一二"

    def test_stream_without_done_after_finish_is_complete(self, user, fake_llm):
        fake_llm.enqueue(chunks=["好", "的"], no_done=True)
        payloads = chat_once(user, {"role_code": "naitang", "message": "嗯"})
        assert payloads[-1] == "[DONE]" and frame_text(payloads) == "好的"
        assert history(user)[1]["is_partial"] is False

    def test_client_disconnect_keeps_partial(self, user, fake_llm):
        fake_llm.enqueue(chunks=["一", "二", "三", "四", "五", "六"], delay=0.3)
        res = stream(user, {"role_code": "naitang", "message": "别走"})
        events = sse_events(res)
        received = ""
        while not received:  # the meta frame and the role frame carry no text
            received += frame_text([next(events)[1]])
        res.close()  # the user closes the page
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            messages = history(user)
            if len(messages) == 2:
                break
            time.sleep(0.1)
        assert messages[0]["content"] == "别走"
        assert messages[1]["is_partial"] is True and messages[1]["content"] in ("一", "一二", "一二三")

    def test_client_disconnect_while_upstream_is_silent(self, user, fake_llm):
        # The upstream goes quiet (a long "thinking" pause); the user leaves. The service must notice at
        # once (not at the 5 s read timeout, nor whenever the next frame comes), cut the upstream, keep what
        # arrived and free the stream slot.
        fake_llm.enqueue(chunks=["想", "一", "想"], hang_after=2)
        res = stream(user, {"role_code": "naitang", "message": "你在想什么"})
        events = sse_events(res)
        received = ""
        while received != "想一":
            received += frame_text([next(events)[1]])
        left = time.monotonic()
        res.close()
        while time.monotonic() - left < 3:
            messages = history(user)
            if len(messages) == 2:
                break
            time.sleep(0.05)
        assert time.monotonic() - left < 1.5
        assert messages[1]["content"] == "想一" and messages[1]["is_partial"] is True
        # Both stream slots are free again: two streams can run at once right away.
        first, second = (stream(user, {"role_code": "naitang", "message": f"再来{i}"}) for i in range(2))
        assert first.status_code == second.status_code == 200
        first.close()
        second.close()


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode()


class TestValidation:
    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({"message": "hi"}, 400, "InvalidInput"),
            ({"role_code": 1, "message": "hi"}, 400, "InvalidInput"),
            ({"role_code": "nobody", "message": "hi"}, 404, "RoleNotFound"),
            ({"role_code": "naitang"}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "   "}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": 5}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "x" * 4001}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "temperature": 2.5}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "temperature": "0.5"}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "temperature": True}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "top_p": 0}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "top_p": 1.5}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "max_tokens": 0}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "max_tokens": 8193}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "max_tokens": 10.5}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "presence_penalty": -2.1}, 400, "InvalidInput"),
            ({"role_code": "naitang", "message": "hi", "frequency_penalty": 3}, 400, "InvalidInput"),
            ({"role_code": "naitang", "image_base64": "not base64!!"}, 400, "InvalidImage"),
            ({"role_code": "naitang", "image_base64": base64.b64encode(b"hello world").decode()}, 400, "InvalidImage"),
            ({"role_code": "naitang", "image_base64": 12}, 400, "InvalidImage"),
            ({"role_code": "naitang", "image_base64": base64.b64encode(PNG).decode()[:-2]}, 400, "InvalidImage"),
            # A decompression bomb: a valid header declaring 100000x100000 pixels.
            (
                {"role_code": "naitang", "image_base64": base64.b64encode(png_header(100_000, 100_000)).decode()},
                400,
                "InvalidImage",
            ),
            (
                {"role_code": "naitang", "image_base64": base64.b64encode(png_header(20_000, 10)).decode()},
                400,
                "InvalidImage",
            ),
            (
                {"role_code": "naitang", "image_base64": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).decode()},
                400,
                "InvalidImage",
            ),
        ],
    )
    def test_rejects(self, app_user, fake_llm, body, status, code):
        assert_error(app_user.post("/chat/stream", body), status, code)
        assert fake_llm.requests == []
        assert history(app_user) == []

    def test_accepts_edges(self, app_user, fake_llm):
        body = {
            "role_code": "naitang",
            "message": "x" * 4000,
            "temperature": 0,
            "top_p": 1,
            "max_tokens": 8192,
            "presence_penalty": -2,
            "frequency_penalty": 2,
        }
        assert chat_once(app_user, body)[-1] == "[DONE]"

    def test_image_size_cap(self, chat_app, fake_llm, new_user):
        client = AppClient(chat_app(image_max_bytes=1024), token=new_user()[1])
        big = base64.b64encode(PNG + b"\x00" * 2048).decode()
        assert_error(client.post("/chat/stream", {"role_code": "naitang", "image_base64": big}), 400, "InvalidImage")

    def test_missing_api_key(self, chat_app, db_url, new_user):
        uid, token = new_user()
        client = AppClient(chat_app(llm_api_key=""), token=token)
        for path in ("/chat/stream", "/chat/send"):
            assert_error(client.post(path, {"role_code": "naitang", "message": "hi"}), 500, "MissingApiKey")
        # Refused before anything was written: no message, no counted event, no slot, no conversation.
        for table in ("messages", "chat_events", "stream_slots", "conversations"):
            assert query(db_url, f"SELECT COUNT(*) FROM {table} WHERE uid = ?", (uid,)) == [(0,)], table


class TestAuth:
    def tokens(self, uid: str) -> dict[str, str | None]:
        now = int(time.time())
        good = {"sub": uid, "iat": now, "exp": now + 600}
        return {
            "missing": None,
            "garbage": "Bearer not-a-jwt",
            "wrong scheme": "Basic " + jwt.encode(good, TEST_SECRET, algorithm="HS256"),
            "foreign secret": "Bearer " + jwt.encode(good, "another-secret-" + "y" * 40, algorithm="HS256"),
            "expired": "Bearer "
            + jwt.encode({**good, "iat": now - 700, "exp": now - 100}, TEST_SECRET, algorithm="HS256"),
            "no exp": "Bearer " + jwt.encode({"sub": uid, "iat": now}, TEST_SECRET, algorithm="HS256"),
            "no sub": "Bearer " + jwt.encode({"iat": now, "exp": now + 600}, TEST_SECRET, algorithm="HS256"),
            "alg none": "Bearer "
            + base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
            + "."
            + base64.urlsafe_b64encode(json.dumps(good).encode()).rstrip(b"=").decode()
            + ".",
            "unknown user": "Bearer " + jwt.encode({**good, "sub": "0" * 24}, TEST_SECRET, algorithm="HS256"),
        }

    @pytest.mark.parametrize(
        "case",
        [
            "missing",
            "garbage",
            "wrong scheme",
            "foreign secret",
            "expired",
            "no exp",
            "no sub",
            "alg none",
            "unknown user",
        ],
    )
    def test_rejected(self, chat_server, new_user, fake_llm, case):
        uid, _ = new_user()
        header = self.tokens(uid)[case]
        headers = {"Authorization": header} if header else {}
        base = chat_server.base_url
        for method, path, body in [
            ("post", "/chat/stream", {"role_code": "naitang", "message": "hi"}),
            ("get", "/chat/history?role_code=naitang", None),
            ("post", "/chat/clear", {"role_code": "naitang"}),
        ]:
            res = getattr(requests, method)(base + path, json=body, headers=headers, timeout=10)
            assert_error(res, 401, "Unauthorized")
        assert fake_llm.requests == []

    def test_a_verified_token_is_remembered_until_it_expires(self):
        from aichat import tokens

        secret = "s" * 40
        # Still valid for about one second (its expiry plus the clock leeway).
        now = time.time()
        token = tokens.issue_token("a" * 24, secret=secret, ttl_s=100 - tokens.CLOCK_LEEWAY_S + 1, now=now - 100)
        claims = tokens.verify_token(token, secret=secret)
        assert tokens.verify_token(token, secret=secret) is claims  # the second check is the remembered one
        with pytest.raises(tokens.ApiError):
            tokens.verify_token(token, secret="t" * 40)  # remembered for its own secret only
        time.sleep(max(0.0, now + 1.2 - time.time()))
        with pytest.raises(tokens.ApiError):
            tokens.verify_token(token, secret=secret)  # expired: refused, remembered or not
        assert (secret, token) not in tokens._verified

    def test_roles_need_no_token(self, chat_server):
        assert requests.get(chat_server.base_url + "/chat/roles", timeout=5).status_code == 200


class TestHistoryAndClear:
    def test_history_errors(self, user):
        assert_error(user.get("/chat/history"), 400, "InvalidInput")
        assert_error(user.get("/chat/history", params={"role_code": "nobody"}), 404, "RoleNotFound")

    def test_clear_errors(self, user):
        assert_error(user.post("/chat/clear", {}), 400, "InvalidInput")
        assert_error(user.post("/chat/clear", {"role_code": "nobody"}), 404, "RoleNotFound")

    def test_users_and_roles_are_isolated(self, chat_server, new_user, fake_llm):
        alice = Client(chat_server.base_url, token=new_user()[1])
        bob = Client(chat_server.base_url, token=new_user()[1])
        chat_once(alice, {"role_code": "naitang", "message": "我是 Alice"})
        chat_once(alice, {"role_code": "wanqing", "message": "杭州现在天气怎么样?"})
        chat_once(bob, {"role_code": "naitang", "message": "我是 Bob"})
        assert [m["content"] for m in history(bob) if m["sender_role"] == "user"] == ["我是 Bob"]
        # Bob clearing naitang leaves Alice's conversations alone.
        res = bob.post("/chat/clear", {"role_code": "naitang"})
        assert res.json() == {"success": True, "message": "当前聊天已清空", "deleted_count": 2}
        assert history(bob) == []
        assert len(history(alice)) == 2 and len(history(alice, "wanqing")) == 2
        # Alice clearing naitang leaves her wanqing conversation.
        assert alice.post("/chat/clear", {"role_code": "naitang"}).json()["deleted_count"] == 2
        assert history(alice) == [] and len(history(alice, "wanqing")) == 2
        assert alice.post("/chat/clear", {"role_code": "naitang"}).json()["deleted_count"] == 0

    def test_cors_preflight_for_stream(self, chat_server):
        res = requests.options(
            chat_server.base_url + "/chat/stream",
            headers={"Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST"},
            timeout=5,
        )
        assert res.status_code == 204 and "Authorization" in res.headers["Access-Control-Allow-Headers"]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("你好", 2), ("hello world", 3), ("abcd", 1), ("abcde", 2), ("😺🐟", 2), ("今天 ok", 3)],
)
def test_token_estimate(text, tokens):
    assert estimate_tokens(text) == tokens
