"""Conversations: several per role, their operations, conversation_id on the contract's operations, settings."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import Client, assert_error, chat_once, frame_text, history, post_stream, query

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
CONVERSATION_KEYS = {
    "conversation_id",
    "role_code",
    "title",
    "is_default",
    "message_count",
    "created_at",
    "updated_at",
    "last_message_at",
    "settings",
}
DEFAULT_SETTINGS = {
    "temperature": None,
    "top_p": None,
    "max_tokens": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "thinking_enabled": False,
    "model": "qwen-plus",
}


def create(client: Client, **body) -> dict:
    """POST /chat/conversations and return the conversation."""
    res = client.post("/chat/conversations", {"role_code": "naitang", **body})
    assert res.status_code == 200, res.text
    answer = res.json()
    assert answer["success"] is True and set(answer["conversation"]) == CONVERSATION_KEYS
    return answer["conversation"]


def listing(client: Client, **params) -> dict:
    """GET /chat/conversations."""
    res = client.get("/chat/conversations", params=params)
    assert res.status_code == 200, res.text
    return res.json()


def meta_of(payloads: list[str]) -> dict:
    """The stream.meta event of a stream."""
    first = json.loads(payloads[0])
    assert first["choices"][0]["delta"]["content"] == ""
    assert first["x_event"]["type"] == "stream.meta"
    return first["x_event"]


class TestOperations:
    def test_create_and_show(self, user):
        made = create(user, title="  周末  计划 ", settings={"temperature": 0.3})
        assert made["title"] == "周末 计划" and made["is_default"] is False and made["message_count"] == 0
        assert made["settings"] == {**DEFAULT_SETTINGS, "temperature": 0.3}
        assert TIMESTAMP.fullmatch(made["created_at"]) and made["last_message_at"] is None
        shown = user.get("/chat/conversation", params={"conversation_id": made["conversation_id"]}).json()
        assert shown == {"success": True, "conversation": made}

    def test_streaming_into_a_conversation_keeps_it_apart(self, user, fake_llm):
        chat_once(user, {"role_code": "naitang", "message": "默认对话里的话"})
        other = create(user)
        fake_llm.reset()
        fake_llm.enqueue(chunks=["新", "对话"])
        payloads = chat_once(user, {"conversation_id": other["conversation_id"], "message": "换个话题：今天吃什么？"})
        meta = meta_of(payloads)
        assert meta["conversation_id"] == other["conversation_id"] and meta["role_code"] == "naitang"
        # The model saw only this conversation's history (the opening line, then the new turn).
        sent = fake_llm.requests[0]["body"]["messages"]
        assert [m["content"] for m in sent if m["role"] == "user"] == ["换个话题：今天吃什么？"]
        # The contract's history (the default conversation) is untouched; the new one has its own.
        assert history(user)[0]["content"] == "默认对话里的话" and len(history(user)) == 2
        body = user.get("/chat/history", params={"conversation_id": other["conversation_id"]}).json()
        assert body["conversation_id"] == other["conversation_id"] and body["role_code"] == "naitang"
        assert [(m["sender_role"], m["content"]) for m in body["messages"]] == [
            ("user", "换个话题：今天吃什么？"),
            ("assistant", "新对话"),
        ]
        assert meta["message_id"] == body["messages"][0]["id"]
        shown = user.get("/chat/conversation", params={"conversation_id": other["conversation_id"]}).json()
        # Named after its first user message until the user renames it.
        assert shown["conversation"]["title"] == "换个话题：今天吃什么？"
        assert shown["conversation"]["message_count"] == 2 and shown["conversation"]["last_message_at"]

    def test_list_most_recent_first_with_paging(self, user, fake_llm):
        chat_once(user, {"role_code": "wanqing", "message": "晚晴你好"})
        made = [create(user, title=f"第{i}个") for i in range(3)]
        chat_once(user, {"conversation_id": made[0]["conversation_id"], "message": "让它最新"})
        everything = listing(user)
        ids = [c["conversation_id"] for c in everything["conversations"]]
        assert ids[0] == made[0]["conversation_id"]  # the most recently active first
        assert set(ids) == {c["conversation_id"] for c in made} | {ids[-1]} and len(ids) == 4
        assert everything["has_more"] is False and everything["next_cursor"] is None
        naitang = listing(user, role_code="naitang")["conversations"]
        assert {c["role_code"] for c in naitang} == {"naitang"} and len(naitang) == 3
        first = listing(user, limit=3)
        assert first["has_more"] is True and [c["conversation_id"] for c in first["conversations"]] == ids[:3]
        rest = listing(user, limit=3, cursor=first["next_cursor"])
        assert [c["conversation_id"] for c in rest["conversations"]] == ids[3:] and rest["has_more"] is False

    @pytest.mark.parametrize(
        "params",
        [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "not-a-cursor"}, {"cursor": "MTox"}],
    )
    def test_list_refuses_bad_paging(self, user, params):
        assert_error(user.get("/chat/conversations", params=params), 400, "InvalidInput")

    def test_list_with_an_unknown_role(self, user):
        assert_error(user.get("/chat/conversations", params={"role_code": "nobody"}), 404, "RoleNotFound")

    def test_update_merges_settings_and_renames(self, user):
        made = create(user, settings={"temperature": 0.3, "max_tokens": 200})
        res = user.post(
            "/chat/conversation/update",
            {
                "conversation_id": made["conversation_id"],
                "title": "改名了",
                "settings": {"temperature": None, "top_p": 0.9},
            },
        )
        assert res.status_code == 200, res.text
        updated = res.json()["conversation"]
        assert updated["title"] == "改名了"
        assert updated["settings"] == {**DEFAULT_SETTINGS, "max_tokens": 200, "top_p": 0.9}
        shown = user.get("/chat/conversation", params={"conversation_id": made["conversation_id"]}).json()
        assert shown["conversation"] == updated

    @pytest.mark.parametrize(
        "change",
        [
            {"settings": {"temperature": 3}},
            {"settings": {"unknown": 1}},
            {"settings": {"thinking_enabled": "yes"}},
            {"settings": {"model": "gpt-unlisted"}},
            {"settings": "hot"},
            {"title": 5},
            {"title": "长" * 101},
        ],
    )
    def test_update_refuses_bad_values(self, user, change):
        made = create(user)
        res = user.post("/chat/conversation/update", {"conversation_id": made["conversation_id"], **change})
        assert_error(res, 400, "InvalidInput")
        shown = user.get("/chat/conversation", params={"conversation_id": made["conversation_id"]}).json()
        assert shown["conversation"] == made  # nothing changed

    def test_delete_removes_it_and_its_messages(self, user, fake_llm, db_url):
        made = create(user)
        chat_once(user, {"conversation_id": made["conversation_id"], "message": "要删掉的"})
        res = user.post("/chat/conversation/delete", {"conversation_id": made["conversation_id"]})
        assert res.json() == {"success": True, "message": "会话已删除", "deleted_count": 2}
        assert query(db_url, "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (made["conversation_id"],)) == [
            (0,)
        ]
        for res in (
            user.get("/chat/conversation", params={"conversation_id": made["conversation_id"]}),
            user.get("/chat/history", params={"conversation_id": made["conversation_id"]}),
            user.post("/chat/stream", {"conversation_id": made["conversation_id"], "message": "还在吗"}),
            user.post("/chat/conversation/delete", {"conversation_id": made["conversation_id"]}),
        ):
            assert_error(res, 404, "ConversationNotFound")


class TestOwnership:
    def test_another_users_conversation_is_not_found(self, chat_server, new_user, fake_llm):
        alice = Client(chat_server.base_url, token=new_user()[1])
        bob = Client(chat_server.base_url, token=new_user()[1])
        made = create(alice)
        chat_once(alice, {"conversation_id": made["conversation_id"], "message": "Alice 的秘密"})
        conversation = {"conversation_id": made["conversation_id"]}
        for res in (
            bob.get("/chat/conversation", params=conversation),
            bob.get("/chat/history", params=conversation),
            bob.post("/chat/stream", {**conversation, "message": "偷看"}),
            bob.post("/chat/send", {**conversation, "message": "偷看"}),
            bob.post("/chat/clear", conversation),
            bob.post("/chat/regenerate", conversation),
            bob.post("/chat/edit", {**conversation, "message": "改掉"}),
            bob.post("/chat/conversation/update", {**conversation, "title": "我的了"}),
            bob.post("/chat/conversation/delete", conversation),
        ):
            assert_error(res, 404, "ConversationNotFound")
        assert listing(bob)["conversations"] == []
        body = alice.get("/chat/history", params=conversation).json()
        assert body["messages"][0]["content"] == "Alice 的秘密" and len(body["messages"]) == 2

    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({"conversation_id": 5, "message": "x"}, 400, "InvalidInput"),
            ({"conversation_id": "nope", "message": "x"}, 404, "ConversationNotFound"),
            ({"conversation_id": "0" * 24, "message": "x"}, 404, "ConversationNotFound"),
            ({"message": "x"}, 400, "InvalidInput"),
        ],
    )
    def test_stream_targets(self, user, fake_llm, body, status, code):
        assert_error(user.post("/chat/stream", body), status, code)
        assert fake_llm.requests == []

    def test_a_role_code_that_disagrees_is_refused(self, user, fake_llm):
        made = create(user)
        res = user.post(
            "/chat/stream", {"conversation_id": made["conversation_id"], "role_code": "wanqing", "message": "x"}
        )
        assert_error(res, 400, "InvalidInput")
        agreeing = chat_once(user, {"conversation_id": made["conversation_id"], "role_code": "naitang", "message": "y"})
        assert agreeing[-1] == "[DONE]"


class TestContractOperationsInAConversation:
    def test_clear_regenerate_and_edit(self, user, fake_llm):
        made = create(user)
        target = {"conversation_id": made["conversation_id"]}
        chat_once(user, {"role_code": "naitang", "message": "默认的"})
        for i in range(2):
            fake_llm.enqueue(chunks=[f"答{i}"])
            chat_once(user, {**target, "message": f"问{i}"})
        fake_llm.enqueue(chunks=["重答"])
        assert frame_text(chat_once_path(user, "/chat/regenerate", target)) == "重答"
        fake_llm.enqueue(chunks=["改答"])
        assert frame_text(chat_once_path(user, "/chat/edit", {**target, "message": "改问"})) == "改答"
        contents = [m["content"] for m in user.get("/chat/history", params=target).json()["messages"]]
        assert contents == ["问0", "答0", "改问", "改答"]
        res = user.post("/chat/clear", target)
        assert res.json() == {"success": True, "message": "当前聊天已清空", "deleted_count": 4}
        assert user.get("/chat/history", params=target).json()["messages"] == []
        assert history(user)[0]["content"] == "默认的"  # the default conversation is untouched


def chat_once_path(client: Client, path: str, body: dict) -> list[str]:
    """POST a streamed operation and read all of it."""
    from tests.helpers import read_stream

    res = client.post(path, body, stream=True)
    assert res.status_code == 200, res.text
    return read_stream(res)


class TestSettingsReachTheModel:
    def test_conversation_settings_and_turn_overrides(self, chat_app, new_user, fake_llm):
        client = chat_app(llm_models=("qwen-plus", "qwen-max"))
        token = new_user()[1]
        settings = {"temperature": 0.2, "model": "qwen-max", "thinking_enabled": True}
        made = client.post(
            "/chat/conversations",
            json={"role_code": "naitang", "settings": settings},
            headers={"Authorization": f"Bearer {token}"},
        ).get_json()["conversation"]
        target = {"conversation_id": made["conversation_id"]}
        assert post_stream(client, "/chat/stream", {**target, "message": "一"}, token)[0] == 200
        turn = {**target, "message": "二", "temperature": 1.1, "thinking_enabled": False}
        assert post_stream(client, "/chat/stream", turn, token)[0] == 200
        assert post_stream(client, "/chat/stream", {**target, "message": "三"}, token)[0] == 200
        first, second, third = (r["body"] for r in fake_llm.requests)
        assert (first["model"], first["temperature"], first["enable_thinking"]) == ("qwen-max", 0.2, True)
        # A turn's parameters override the conversation's for that turn only.
        assert (second["model"], second["temperature"], second["enable_thinking"]) == ("qwen-max", 1.1, False)
        assert (third["temperature"], third["enable_thinking"]) == (0.2, True)
        status, body = post_stream(client, "/chat/stream", {**target, "message": "四", "model": "gpt-4o"}, token)
        assert status == 400 and json.loads(body)["code"] == "InvalidInput"

    def test_thinking_is_off_unless_asked(self, chat_app, new_user, fake_llm):
        token = new_user()[1]
        assert post_stream(chat_app(), "/chat/stream", {"role_code": "naitang", "message": "hi"}, token)[0] == 200
        assert fake_llm.requests[0]["body"]["enable_thinking"] is False
        quiet = chat_app(llm_thinking_flag=False)
        assert post_stream(quiet, "/chat/stream", {"role_code": "naitang", "message": "hi"}, token)[0] == 200
        assert "enable_thinking" not in fake_llm.requests[1]["body"]
