"""The stream rule: every frame readable by the contract's client rule, in Node and in Python; /chat/send."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from aichat.chat.turn import client_frame
from aichat.sse import EventParser, EventTooLong

from tests.conftest import IN_CI
from tests.helpers import Client, assert_error, chat_once, history, query, read_stream

NODE = shutil.which("node")
NAIVE_JS = Path(__file__).parent / "js" / "naive_client.mjs"


def naive_python(client: Client, path: str, body: dict) -> str:
    """The contract's rule in Python: json.loads(data)["choices"][0]["delta"]["content"], concatenated."""
    res = client.post(path, body, stream=True)
    assert res.status_code == 200, res.text
    text = ""
    for payload in read_stream(res):
        if payload == "[DONE]":
            return text
        text += json.loads(payload)["choices"][0]["delta"]["content"]  # a None would raise TypeError here
    raise AssertionError("no [DONE]")


def naive_node(client: Client, path: str, body: dict) -> str:
    """The same rule in JavaScript (fetch + a stream reader, no optional chaining), run by Node."""
    if NODE is None:
        if IN_CI:
            pytest.fail("node is required in CI for the naive-client test")
        pytest.skip("node is not installed")
    result = subprocess.run(
        [NODE, str(NAIVE_JS), client.base_url + path, client.token or "", json.dumps(body, ensure_ascii=False)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # a frame without choices[0] throws in JSON.parse(...).choices[0]
    answer = json.loads(result.stdout)
    assert "error" not in answer and answer["frames"] >= 1, answer
    return answer["text"]


def last_reply(client: Client) -> dict:
    """The newest assistant message of the default naitang conversation."""
    return next(m for m in reversed(history(client)) if m["sender_role"] == "assistant")


SCRIPTS = {
    "plain": {"chunks": ["你", "好", "呀"]},
    "reasoning and usage": {"reasoning": "先想想", "chunks": ["抱", "抱你"], "usage": {"prompt_tokens": 9}},
    "upstream drops mid-reply": {"chunks": ["一", "二", "三"], "drop_after": 2},
    "malformed frame mid-reply": {"chunks": ["一", "二", "三"], "malformed_after": 2},
}


@pytest.mark.parametrize("reader", [naive_python, naive_node], ids=["python", "node"])
@pytest.mark.parametrize("script", list(SCRIPTS), ids=list(SCRIPTS))
@pytest.mark.parametrize("path", ["/chat/stream", "/chat/regenerate", "/chat/edit"])
def test_a_naive_client_reads_exactly_what_is_stored(user, fake_llm, reader, script, path):
    if path != "/chat/stream":
        fake_llm.enqueue(chunks=["先有", "一条"])
        chat_once(user, {"role_code": "naitang", "message": "先说一句"})
    fake_llm.enqueue(**SCRIPTS[script])
    body = {"role_code": "naitang"} if path == "/chat/regenerate" else {"role_code": "naitang", "message": "再说"}
    text = reader(user, path, body)
    stored = last_reply(user)
    assert text == stored["content"] and text  # the client's text is the stored reply, nothing more
    assert stored["is_partial"] is ("mid-reply" in script)


def test_the_last_frame_carries_usage_and_the_stored_ids(user, fake_llm):
    fake_llm.enqueue(chunks=["好"], usage={"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13})
    frames = [json.loads(p) for p in chat_once(user, {"role_code": "naitang", "message": "嗨"})[:-1]]
    assert all(
        f["object"] == "chat.completion.chunk" and isinstance(f["choices"][0]["delta"]["content"], str) for f in frames
    )
    assert all(f["choices"] for f in frames)  # the upstream's usage-only frame (choices: []) never reaches a client
    meta, done = frames[0]["x_event"], frames[-1]["x_event"]
    stored = history(user)
    assert meta == {
        "type": "stream.meta",
        "conversation_id": meta["conversation_id"],
        "message_id": stored[0]["id"],
        "role_code": "naitang",
    }
    assert done["type"] == "done" and done["message_id"] == stored[1]["id"]
    assert done["conversation_id"] == meta["conversation_id"] and done["finish_reason"] == "stop"
    assert frames[-1]["usage"] == done["usage"] == {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}
    assert [f for f in frames[1:-1] if "x_event" in f] == []
    assert not any("error" in f for f in frames)


class TestSend:
    def test_answers_the_whole_reply_as_json(self, user, fake_llm, db_url):
        fake_llm.enqueue(reasoning="想一下", chunks=["整", "句", "回答"])
        res = user.post("/chat/send", {"role_code": "naitang", "message": "一次说完"})
        assert res.status_code == 200 and res.headers["Content-Type"] == "application/json; charset=utf-8"
        body = res.json()
        stored = history(user)
        assert body["user_message_id"] == stored[0]["id"] and stored[0]["content"] == "一次说完"
        message = body["message"]
        assert {
            k: message[k] for k in ("id", "sender_role", "content", "has_image", "is_partial", "created_at")
        } == stored[1]
        assert message["content"] == "整句回答" and message["reasoning_content"] == "想一下"
        assert message["usage"]["completion_tokens"] > 0
        assert isinstance(body["conversation_id"], str) and body["success"] is True
        assert fake_llm.requests[0]["body"]["stream"] is True  # the same turn engine, collected

    def test_upstream_refusal_keeps_the_user_message(self, user, fake_llm):
        fake_llm.enqueue(status=500)
        assert_error(user.post("/chat/send", {"role_code": "naitang", "message": "在吗"}), 502, "UpstreamHTTPError")
        assert [(m["sender_role"], m["content"]) for m in history(user)] == [("user", "在吗")]

    def test_a_reply_cut_short_is_an_error_and_stays_partial(self, user, fake_llm):
        fake_llm.enqueue(chunks=["一", "二", "三", "四"], drop_after=2)
        assert_error(user.post("/chat/send", {"role_code": "naitang", "message": "讲完"}), 502, "NetworkError")
        stored = history(user)
        assert stored[1]["content"] == "一二" and stored[1]["is_partial"] is True

    def test_same_validation_as_the_stream(self, user, fake_llm):
        assert_error(user.post("/chat/send", {"role_code": "naitang"}), 400, "InvalidInput")
        assert_error(user.post("/chat/send", {"role_code": "nobody", "message": "x"}), 404, "RoleNotFound")
        assert fake_llm.requests == []


# -- the pure parts -------------------------------------------------------------------------------
def events(*chunks: bytes) -> list[bytes]:
    parser = EventParser(max_event_bytes=1024)
    return [event for chunk in chunks for event in parser.feed(chunk)]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ((b"data: a\n\ndata: b\n\n",), [b"a", b"b"]),
        ((b"data: a\r\rdata: b\r\r",), [b"a", b"b"]),  # CR-only line endings
        ((b"data: a\r", b"\n\r\n"), [b"a"]),  # a CRLF split across reads is one line end
        ((b'data: {\ndata: "x": 1}\n\n',), [b'{\n"x": 1}']),  # multi-line data joins with LF
        ((b"\xef\xbb\xbfdata: a\n\n",), [b"a"]),  # a leading BOM is skipped
        ((b"\xef", b"\xbb\xbfdata: a\n\n"), [b"a"]),  # even split across reads
        ((b": ping\n\nevent: x\nid: 3\ndata:a\n\n",), [b"a"]),  # comments and other fields ignored
        ((b"data: a\n\ndata: pending",), [b"a"]),  # data pending at the end is not an event yet
    ],
)
def test_sse_parser_follows_the_specification(chunks, expected):
    assert events(*chunks) == expected


def test_sse_parser_bounds_an_event():
    with pytest.raises(EventTooLong):
        events(b"data: " + b"x" * 2000)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"choices": [{"delta": {"content": "hi"}}]}, "forwarded"),
        (
            {"choices": [{"delta": {"content": None, "reasoning_content": "想"}}]},
            {"content": "", "reasoning_content": "想"},
        ),
        ({"choices": [{"delta": {"role": "assistant"}}]}, None),
        ({"choices": [], "usage": {"total_tokens": 3}}, None),
        ({"choices": [{"delta": {"content": "", "tool_calls": [{"index": 0}]}, "finish_reason": None}]}, None),
        ({"choices": [{"delta": {}, "finish_reason": "stop"}]}, {"content": ""}),
        ({"choices": [{"delta": {"content": "x"}}], "usage": {"total_tokens": 3}}, {"content": "x"}),
    ],
)
def test_client_frames(frame, expected):
    payload = json.dumps(frame).encode()
    out = client_frame(frame, payload)
    if expected == "forwarded":
        assert out == b"data: " + payload + b"\n\n"
    elif expected is None:
        assert out is None
    else:
        rebuilt = json.loads(out[6:])
        assert rebuilt["object"] == "chat.completion.chunk" and "usage" not in rebuilt
        assert rebuilt["choices"][0]["delta"] == expected


def test_send_stores_once(user, fake_llm, db_url):
    fake_llm.enqueue(chunks=["一次"])
    uid = query(db_url, "SELECT uid FROM messages WHERE id = (SELECT MAX(id) FROM messages)")  # any row: warm-up
    assert uid is not None
    user.post("/chat/send", {"role_code": "naitang", "message": "只存一次"})
    assert [m["content"] for m in history(user)] == ["只存一次", "一次"]


def test_the_disconnect_watcher_outlives_a_failing_round(monkeypatch):
    # One unexpected exception must not end hang-up detection for the whole process.
    import socket
    import threading

    from aichat.disconnect import DisconnectWatcher

    watcher = DisconnectWatcher()
    original = watcher._round
    failures = iter([RuntimeError("boom")])

    def flaky_round() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        original()

    monkeypatch.setattr(watcher, "_round", flaky_round)
    gone = threading.Event()
    ours, theirs = socket.socketpair()
    watcher.watch(ours, gone.set)
    theirs.close()  # a hang-up (end-of-file; with no on_eof, on_gone is called)
    assert gone.wait(3)
    ours.close()
