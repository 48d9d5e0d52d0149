"""Tests of the dev-only fake OpenAI-compatible streaming upstream."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dev.fake_llm import FakeLLM, split_pieces

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "你是小伴"}, {"role": "user", "content": "今天好累啊"}]


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    """Run a zero-delay fake for the duration of one test."""
    server = FakeLLM(delay=0.0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """Provide a requests session that is always closed (ResourceWarnings are errors under -W error)."""
    with requests.Session() as session:
        yield session


def _chat(http: requests.Session, base_url: str, **extra: Any) -> requests.Response:
    """POST a streaming chat request and return the unread response."""
    body = {"model": "qwen-plus", "messages": MESSAGES, "stream": True, **extra}
    return http.post(f"{base_url}/chat/completions", json=body, stream=True, timeout=5)


def _frames(lines: list[str]) -> list[Any]:
    """Decode the JSON data frames among SSE lines (skipping [DONE])."""
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {") and line != "data: [DONE]"]


def _content(frames: list[Any]) -> str:
    """Join the content deltas of chat.completion.chunk frames."""
    return "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"])


def _parse_chunked(raw: bytes) -> list[bytes]:
    """Strictly parse a chunked body ending in the zero chunk, returning the chunk payloads."""
    chunks, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        data = raw[end + 2 : end + 2 + size]
        assert len(data) == size and raw[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size
        if size == 0:
            assert pos == len(raw), "bytes after the terminating chunk"
            return chunks
        chunks.append(data)


def test_split_pieces_round_trips() -> None:
    """Pieces are small and rejoin to the exact text."""
    text = "（本地替身模型）你说的是：「hello big world」。 end "
    pieces = split_pieces(text)
    assert "".join(pieces) == text and len(pieces) > 8 and max(map(len, pieces)) <= 7


def test_default_reply_streams_incrementally() -> None:
    """Frames arrive as they are produced, in the OpenAI chunk shape, ending with [DONE]."""
    with FakeLLM(delay=0.2) as slow, requests.Session() as http:
        slow.enqueue(chunks=["一", "二", "三", "四", "五"])
        start = time.monotonic()
        with _chat(http, slow.base_url) as resp:
            assert resp.status_code == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Transfer-Encoding"] == "chunked"
            lines, first_at = [], None
            for line in resp.iter_lines(decode_unicode=True):
                if line and first_at is None:
                    first_at = time.monotonic() - start
                lines.append(line)
        total = time.monotonic() - start
    assert first_at is not None and first_at < 0.5 and total > 0.8
    assert [line for line in lines if line][-1] == "data: [DONE]"
    frames = _frames(lines)
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert frames[0]["object"] == "chat.completion.chunk" and frames[0]["model"] == "qwen-plus"
    assert all(f["id"].startswith("chatcmpl-") and isinstance(f["x_sent_at"], float) for f in frames)
    assert _content(frames) == "一二三四五"
    assert [f["choices"][0]["finish_reason"] for f in frames] == [None] * 5 + ["stop"]


def test_default_reply_is_valid_chunked_with_usage(fake: FakeLLM) -> None:
    """The raw body is strict chunked encoding; the default text echoes the user and usage precedes [DONE]."""
    body = json.dumps(
        {
            "model": "qwen-plus",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /compatible-mode/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(head + body)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    header_blob, _, payload = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in header_blob
    events = [chunk.decode() for chunk in _parse_chunked(payload)]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    frames = [json.loads(e[6:]) for e in events[:-1]]
    text = _content(frames)
    assert text.startswith("（本地替身模型）") and "今天好累啊" in text and "不是真实的大模型" in text
    assert frames[-1]["choices"] == [] and frames[-1]["usage"]["total_tokens"] > 0
    assert fake.requests == [
        {
            "path": "/compatible-mode/v1/chat/completions",
            "headers": {"Authorization": "Bearer sk-test"},
            "body": json.loads(body),
        }
    ]


def test_vision_non_stream_reply(fake: FakeLLM, http: requests.Session) -> None:
    """A non-stream vision request gets a chat.completion that echoes the text and mentions the image."""
    content = [{"type": "text", "text": "看看这张图"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    body = {"model": "qwen-vl-plus", "messages": [{"role": "user", "content": content}], "stream": False}
    resp = http.post(f"{fake.base_url}/v1/chat/completions", json=body, timeout=5)
    data = resp.json()
    assert resp.status_code == 200 and data["object"] == "chat.completion"
    message = data["choices"][0]["message"]
    assert "看看这张图" in message["content"] and "图片" in message["content"]


def test_scripted_401(fake: FakeLLM, http: requests.Session) -> None:
    """A status script returns that status and scripted JSON body; the next request gets the default."""
    error = {"error": {"message": "Invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}}
    fake.enqueue(status=401, body=error)
    with _chat(http, fake.base_url) as resp:
        assert resp.status_code == 401 and resp.json() == error
    with _chat(http, fake.base_url) as resp:
        assert resp.status_code == 200


def test_drop_after_breaks_the_stream(fake: FakeLLM, http: requests.Session) -> None:
    """drop_after cuts the connection without the terminating chunk after N content frames."""
    fake.enqueue(chunks=["a", "b", "c", "d"], drop_after=2)
    lines: list[str] = []
    with _chat(http, fake.base_url) as resp, pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in resp.iter_lines(decode_unicode=True):
            lines.append(line)
    assert _content(_frames(lines)) == "ab"


def test_no_done_and_other_faults(fake: FakeLLM, http: requests.Session) -> None:
    """no_done ends cleanly without [DONE]; malformed, overlong, reasoning and forced usage frames appear."""
    fake.enqueue(
        chunks=["x", "y"],
        reasoning="先想一想",
        no_done=True,
        malformed_after=1,
        overlong_after=2,
        overlong_bytes=100_000,
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    )
    with _chat(http, fake.base_url) as resp:
        lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert "data: [DONE]" not in lines
    assert lines[2] == "data: {not json"
    overlong = [line for line in lines if len(line.encode()) > 10_000]
    assert len(overlong) == 1 and len(overlong[0].encode()) == 100_000
    frames = _frames([line for line in lines if line != "data: {not json"])
    reasoning = "".join(f["choices"][0]["delta"].get("reasoning_content", "") for f in frames if f["choices"])
    assert reasoning == "先想一想" and _content(frames) == "xy"
    assert frames[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_http_control_endpoints(fake: FakeLLM, http: requests.Session) -> None:
    """/_script queues scripts, /_requests lists recorded requests and /_reset clears both."""
    assert http.post(f"{fake.base_url}/_script", json={"status": 500, "body": "boom"}, timeout=5).ok
    assert http.post(f"{fake.base_url}/_script", json={"text": "hello there"}, timeout=5).ok
    assert http.post(f"{fake.base_url}/_script", json={"bogus": 1}, timeout=5).status_code == 400
    with _chat(http, fake.base_url) as resp:
        assert resp.status_code == 500 and resp.text == "boom"
    with _chat(http, fake.base_url) as resp:
        assert _content(_frames(list(resp.iter_lines(decode_unicode=True)))) == "hello there"
    recorded = http.get(f"{fake.base_url}/_requests", timeout=5).json()
    assert len(recorded) == 2 and recorded[0]["body"]["messages"] == MESSAGES
    fake.enqueue(status=429)
    assert http.post(f"{fake.base_url}/_reset", timeout=5).ok
    assert http.get(f"{fake.base_url}/_requests", timeout=5).json() == []
    with _chat(http, fake.base_url) as resp:
        assert resp.status_code == 200


def _conn_threads(exclude: set[threading.Thread] = frozenset()) -> list[threading.Thread]:
    """Return the live threads of fakes, except those in `exclude` (e.g. a session-wide fake's)."""
    return [t for t in threading.enumerate() if t.name.startswith("fake-llm") and t not in exclude]


def test_hang_ends_when_client_leaves(fake: FakeLLM, http: requests.Session) -> None:
    """A hanging stream's handler thread exits soon after the client closes the connection."""
    before = set(threading.enumerate())
    fake.enqueue(chunks=["a", "b"], hang_after=1)
    with _chat(http, fake.base_url) as resp:
        next(line for line in resp.iter_lines(decode_unicode=True) if '"content":"a"' in line)
    http.close()
    deadline = time.monotonic() + 1.0
    while any(t.name == "fake-llm-conn" for t in _conn_threads(before)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "fake-llm-conn" for t in _conn_threads(before))


def test_stop_is_prompt_during_hang(http: requests.Session) -> None:
    """stop() returns quickly with a hang_after stream open, drops that stream and leaves no threads."""
    before = set(threading.enumerate())
    server = FakeLLM(delay=0.0).start()
    server.enqueue(chunks=["a", "b"], hang_after=1)
    with _chat(http, server.base_url) as resp:
        lines = resp.iter_lines(decode_unicode=True)
        next(line for line in lines if '"content":"a"' in line)
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 0.5
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            list(lines)
    assert _conn_threads(exclude=before) == []


def test_cli_runs_and_exits_on_sigterm(http: requests.Session) -> None:
    """The standalone CLI prints its URL, serves, and exits 0 on SIGTERM."""
    cmd = [sys.executable, str(ROOT / "dev" / "fake_llm.py"), "--port", "0", "--delay", "0"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("fake-llm listening on http://127.0.0.1:")
            base_url = line.rsplit(" ", 1)[1]
            with _chat(http, base_url) as resp:
                assert "本地替身模型" in _content(_frames(list(resp.iter_lines(decode_unicode=True))))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=3) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
