"""POST /chat/continue: a reply cut short is continued in place; only the new text streams."""

from __future__ import annotations

import json

from aichat.chat.continuation import CONTINUE_PROMPT

from tests.helpers import AppClient, Client, assert_error, events_of, history, post_stream, read_stream


def cut_reply(client, fake_llm) -> dict:
    """A reply the upstream dropped after two pieces: stored as partial."""
    fake_llm.enqueue(chunks=["一", "二", "三"], drop_after=2)
    res = client.post("/chat/stream", {"role_code": "naitang", "message": "数数"}, stream=True)
    read_stream(res)
    reply = history(client)[-1]
    assert reply["is_partial"] is True and reply["content"] == "一二"
    return reply


def continued(client, message_id: int) -> tuple[list[dict], str]:
    res = client.post("/chat/continue", {"message_id": message_id}, stream=True)
    assert res.status_code == 200, res.text
    payloads = read_stream(res)
    frames = [json.loads(p) for p in payloads if p != "[DONE]"]
    return frames, "".join(f["choices"][0]["delta"]["content"] for f in frames)


def test_a_cut_reply_is_continued_in_place(user, fake_llm):
    reply = cut_reply(user, fake_llm)
    fake_llm.reset()
    fake_llm.enqueue(chunks=["三", "四"])
    frames, text = continued(user, reply["id"])
    assert text == "三四"  # only the new text
    done = frames[-1]["x_event"]
    assert done["type"] == "done" and done["message_id"] == reply["id"]
    assert frames[0]["x_event"]["continues"] == reply["id"]
    stored = history(user)
    assert [m["sender_role"] for m in stored] == ["user", "assistant"]  # no new rows
    assert stored[-1]["id"] == reply["id"] and stored[-1]["content"] == "一二三四" and stored[-1]["is_partial"] is False
    (sent,) = fake_llm.requests
    assert sent["body"]["messages"][-1] == {"role": "assistant", "content": "一二", "partial": True}
    assert sent["body"]["messages"][-2] == {"role": "user", "content": "数数"}
    assert sent["body"]["enable_thinking"] is False  # partial mode does not take thinking


def test_a_continuation_cut_again_stays_partial_and_keeps_growing(user, fake_llm):
    reply = cut_reply(user, fake_llm)
    fake_llm.enqueue(chunks=["三", "四", "五"], drop_after=1)
    continued(user, reply["id"])
    stored = history(user)[-1]
    assert stored["content"] == "一二三" and stored["is_partial"] is True
    fake_llm.enqueue(chunks=["四五"])
    _, text = continued(user, reply["id"])
    assert text == "四五" and history(user)[-1]["content"] == "一二三四五"


def test_other_upstreams_get_a_prompt_to_go_on(chat_app, fake_llm, new_user):
    client = AppClient(chat_app(llm_partial_mode=False), token=new_user()[1])
    fake_llm.enqueue(chunks=["半", "句", "话"], drop_after=2)
    post_stream(client.app_client, "/chat/stream", {"role_code": "naitang", "message": "说"}, client.token)
    reply_id = client.get("/chat/history", {"role_code": "naitang"}).json()["messages"][-1]["id"]
    fake_llm.reset()
    fake_llm.enqueue(chunks=["话。"])
    status, body = post_stream(client.app_client, "/chat/continue", {"message_id": reply_id}, client.token)
    assert status == 200 and "".join(f["choices"][0]["delta"]["content"] for f in events_of(body)) == "话。"
    messages = fake_llm.requests[0]["body"]["messages"]
    assert messages[-2:] == [{"role": "assistant", "content": "半句"}, {"role": "user", "content": CONTINUE_PROMPT}]


def test_only_the_users_last_cut_reply_can_be_continued(user, chat_server, new_user, fake_llm):
    fake_llm.enqueue(chunks=["完整的回复"])
    read_stream(user.post("/chat/stream", {"role_code": "naitang", "message": "一"}, stream=True))
    complete, asked = history(user)[-1], history(user)[-2]
    assert_error(user.post("/chat/continue", {"message_id": complete["id"]}), 400, "InvalidInput")
    assert_error(user.post("/chat/continue", {"message_id": asked["id"]}), 400, "InvalidInput")
    reply = cut_reply(user, fake_llm)
    fake_llm.enqueue(chunks=["后来的"])
    read_stream(user.post("/chat/stream", {"role_code": "naitang", "message": "再说"}, stream=True))
    assert_error(user.post("/chat/continue", {"message_id": reply["id"]}), 400, "InvalidInput")  # not the last
    other = Client(chat_server.base_url, token=new_user()[1])
    assert_error(other.post("/chat/continue", {"message_id": reply["id"]}), 404, "MessageNotFound")
    assert_error(user.post("/chat/continue", {"message_id": 10**12}), 404, "MessageNotFound")
    assert_error(user.post("/chat/continue", {}), 400, "InvalidInput")


def test_a_naive_client_reads_only_the_new_text(user, fake_llm):
    from tests.test_stream_rule import naive_node

    reply = cut_reply(user, fake_llm)
    fake_llm.enqueue(chunks=["三", "四"])
    assert naive_node(user, "/chat/continue", {"message_id": reply["id"]}) == "三四"


def test_a_repeated_continue_replays_only_what_it_added(user, fake_llm):
    reply = cut_reply(user, fake_llm)
    fake_llm.enqueue(chunks=["三", "四"])
    headers = {"Idempotency-Key": "continue-once"}
    first = user.post("/chat/continue", {"message_id": reply["id"]}, stream=True, headers=headers)
    read_stream(first)
    res = user.post("/chat/continue", {"message_id": reply["id"]}, stream=True, headers=headers)
    frames = [json.loads(p) for p in read_stream(res) if p != "[DONE]"]
    assert "".join(f["choices"][0]["delta"]["content"] for f in frames) == "三四"  # not 一二三四 again
    assert frames[0]["x_event"]["continues"] == reply["id"] and frames[0]["x_event"]["replayed"] is True
    assert history(user)[-1]["content"] == "一二三四"
