"""Extensions beyond the contract: history paging, message operations, account management."""

from __future__ import annotations

import re
import time

import jwt
import pytest

from tests.helpers import Client, assert_error, chat_once, frame_text, history, query, sse_events, stream, with_redis

# Token liveness, limits and throttles: these tests run a third time with Redis holding that state.
pytestmark = pytest.mark.redis_state


def converse(client: Client, fake_llm, turns: int) -> None:
    """Add `turns` user/assistant pairs to the naitang conversation."""
    for i in range(turns):
        fake_llm.enqueue(chunks=[f"回复{i}"])
        chat_once(client, {"role_code": "naitang", "message": f"消息{i}"})


class TestHistoryPaging:
    def test_pages_walk_back_through_the_conversation(self, user, fake_llm):
        converse(user, fake_llm, 3)  # 6 messages
        everything = history(user)
        first = user.get("/chat/history", params={"role_code": "naitang", "limit": 4}).json()
        assert [m["id"] for m in first["messages"]] == [m["id"] for m in everything[2:]]
        assert first["has_more"] is True and first["next_before_id"] == everything[2]["id"]
        second = user.get(
            "/chat/history", params={"role_code": "naitang", "limit": 4, "before_id": first["next_before_id"]}
        ).json()
        assert [m["id"] for m in second["messages"]] == [m["id"] for m in everything[:2]]
        assert second["has_more"] is False and second["next_before_id"] is None

    def test_without_parameters_the_contract_shape_is_unchanged(self, user, fake_llm):
        converse(user, fake_llm, 1)
        body = user.get("/chat/history", params={"role_code": "naitang"}).json()
        assert set(body) == {"success", "role_code", "messages"}

    @pytest.mark.parametrize(
        "params", [{"limit": 0}, {"limit": 201}, {"limit": "x"}, {"limit": "²"}, {"before_id": "-1"}]
    )
    def test_invalid_paging(self, user, params):
        assert_error(user.get("/chat/history", params={"role_code": "naitang", **params}), 400, "InvalidInput")


class TestMessageOperations:
    def test_delete_my_message_only(self, chat_server, new_user, fake_llm):
        alice = Client(chat_server.base_url, token=new_user()[1])
        bob = Client(chat_server.base_url, token=new_user()[1])
        converse(alice, fake_llm, 1)
        target, reply = history(alice)
        # Bob cannot delete (or even detect) Alice's message.
        assert_error(bob.post("/chat/message/delete", {"message_id": target["id"]}), 404, "MessageNotFound")
        assert len(history(alice)) == 2
        res = alice.post("/chat/message/delete", {"message_id": target["id"]})
        assert res.json() == {"success": True, "message": "消息已删除", "deleted_count": 1}
        # Exactly that message went: the reply after it is still there.
        assert [(m["id"], m["content"]) for m in history(alice)] == [(reply["id"], reply["content"])]
        assert_error(alice.post("/chat/message/delete", {"message_id": target["id"]}), 404, "MessageNotFound")
        assert_error(alice.post("/chat/message/delete", {"message_id": "1"}), 400, "InvalidInput")
        assert_error(alice.post("/chat/message/delete", {}), 400, "InvalidInput")

    def test_regenerate_replaces_the_last_reply(self, user, fake_llm):
        converse(user, fake_llm, 2)
        before = history(user)
        fake_llm.reset()
        fake_llm.enqueue(chunks=["新的", "回复"])
        res = user.post("/chat/regenerate", {"role_code": "naitang", "temperature": 0.5}, stream=True)
        assert res.status_code == 200 and res.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        payloads = [line[6:] for line in res.text.split("\n\n") if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]" and frame_text(payloads) == "新的回复"
        after = history(user)
        assert [m["content"] for m in after] == ["消息0", "回复0", "消息1", "新的回复"]
        assert after[2]["id"] == before[2]["id"]  # the user's message itself is kept
        sent = fake_llm.requests[0]["body"]
        assert sent["temperature"] == 0.5
        assert [m["content"] for m in sent["messages"][2:]] == ["消息0", "回复0", "消息1"]

    def test_regenerate_answers_a_message_left_without_reply(self, user, fake_llm):
        fake_llm.enqueue(status=500)
        user.post("/chat/stream", {"role_code": "naitang", "message": "在吗"})
        fake_llm.enqueue(chunks=["在的"])
        user.post("/chat/regenerate", {"role_code": "naitang"}).close()
        assert [m["content"] for m in history(user)] == ["在吗", "在的"]

    def test_regenerate_needs_a_user_message(self, user):
        assert_error(user.post("/chat/regenerate", {"role_code": "naitang"}), 400, "InvalidInput")
        assert_error(user.post("/chat/regenerate", {"role_code": "nobody"}), 404, "RoleNotFound")

    def test_edit_last_message_and_regenerate(self, user, fake_llm):
        converse(user, fake_llm, 2)
        last_user = history(user)[2]
        fake_llm.reset()
        fake_llm.enqueue(chunks=["改过", "的回复"])
        res = user.post("/chat/edit", {"role_code": "naitang", "message": "改过的消息", "message_id": last_user["id"]})
        assert res.status_code == 200
        after = history(user)
        assert [m["content"] for m in after] == ["消息0", "回复0", "改过的消息", "改过的回复"]
        assert after[2]["id"] == last_user["id"]
        assert fake_llm.requests[0]["body"]["messages"][-1] == {"role": "user", "content": "改过的消息"}
        # Only the last user message can be edited.
        res = user.post("/chat/edit", {"role_code": "naitang", "message": "x", "message_id": after[0]["id"]})
        assert_error(res, 400, "InvalidInput")
        assert_error(user.post("/chat/edit", {"role_code": "naitang"}), 400, "InvalidInput")


class TestAccount:
    def test_me(self, login_server, new_user):
        uid, token = new_user()
        res = Client(login_server.base_url, token=token).get("/me")
        assert res.status_code == 200
        user = res.json()["user"]
        assert user["uid"] == uid and user["country_code"] == "86"
        assert re.fullmatch(r"19\d\*{4}\d{4}", user["phone_number"])
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", user["created_at"])
        assert_error(Client(login_server.base_url).get("/me"), 401, "Unauthorized")

    def test_logout_revokes_the_token_everywhere(self, login_server, chat_server, new_user):
        _, token = new_user()
        _, other_token = new_user()
        login = Client(login_server.base_url, token=token)
        chat = Client(chat_server.base_url, token=token)
        assert chat.get("/chat/history", params={"role_code": "naitang"}).status_code == 200
        assert login.post("/logout").json() == {"success": True, "message": "已退出登录"}
        # Another process (ChatService) refuses it too; other sessions are untouched.
        assert_error(chat.get("/chat/history", params={"role_code": "naitang"}), 401, "Unauthorized")
        assert_error(login.get("/me"), 401, "Unauthorized")
        assert_error(login.post("/logout"), 401, "Unauthorized")
        assert Client(login_server.base_url, token=other_token).get("/me").status_code == 200

    def test_account_deletion_erases_everything(self, login_server, chat_server, new_user, fake_llm, db_url, request):
        uid, token = new_user()
        chat = Client(chat_server.base_url, token=token)
        converse(chat, fake_llm, 2)
        (phone,) = query(db_url, "SELECT phone_number FROM users WHERE uid = ?", (uid,))[0]
        # A stream is still running when the account goes: it holds a slot, and its reply must not outlive it.
        fake_llm.enqueue(chunks=["还", "在", "说"], hang_after=2)
        running = stream(chat, {"role_code": "naitang", "message": "最后一句"})
        reader = sse_events(running)
        while "还" not in frame_text([next(reader)[1]]):
            pass
        before = {
            "stream_slots": ("uid", uid),
            "chat_events": ("uid", uid),
            "conversations": ("uid", uid),
            "verification_codes": ("phone_number", phone),
            "send_cooldowns": ("phone_key", f"86:{phone}"),
        }
        in_redis: list[str] = []
        if with_redis(db_url):  # the limits, slots and cooldown are kept there instead
            rdb = request.getfixturevalue("rdb")
            in_redis = [f"aichat:chat:{name}:{uid}" for name in ("slots", "events")]
            in_redis += [f"aichat:sms:{name}:86:{phone}" for name in ("cooldown", "phone")]
            for table in ("stream_slots", "chat_events", "send_cooldowns"):
                del before[table]
            assert [key for key in in_redis if not rdb.exists(key)] == []
        for table, (column, value) in before.items():
            assert query(db_url, f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (value,))[0][0] >= 1, table
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        res = Client(login_server.base_url, token=token).post("/account/delete")
        assert res.json() == {"success": True, "message": "账号已注销", "deleted_messages": 5}
        for table, (column, value) in {**before, "messages": ("uid", uid), "users": ("uid", uid)}.items():
            assert query(db_url, f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (value,))[0][0] == 0, table
        assert query(db_url, "SELECT COUNT(*) FROM revoked_tokens WHERE jti = ?", (jti,)) == [(1,)]
        assert [key for key in in_redis if rdb.exists(key)] == []
        # The running stream ends (the user closes the app): what it received is not stored for a deleted user.
        running.close()
        time.sleep(0.5)
        assert query(db_url, "SELECT COUNT(*) FROM messages WHERE uid = ?", (uid,)) == [(0,)]
        assert_error(chat.get("/chat/history", params={"role_code": "naitang"}), 401, "Unauthorized")
