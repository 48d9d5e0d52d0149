"""Tests of the dev-only fake OpenAI-compatible streaming upstream."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from http.client import HTTPConnection
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


# --- SSE framing keys: line_ending, bom, multiline, gzip, comments ---------------------------------------------


def _raw_stream(fake: FakeLLM, **script: Any) -> tuple[dict[str, str], list[bytes]]:
    """Run one scripted streaming request over a raw socket; return the lower-cased headers and chunk payloads."""
    fake.enqueue(**script)
    body = json.dumps({"model": "qwen-plus", "messages": MESSAGES, "stream": True}).encode()
    head = (
        f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(head + body)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    header_blob, _, payload = raw.partition(b"\r\n\r\n")
    status, *lines = header_blob.decode().split("\r\n")
    assert status == "HTTP/1.1 200 OK"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return headers, _parse_chunked(payload)


def _events(body: bytes, eol: bytes = b"\n") -> list[list[bytes]]:
    """Split an SSE body into events (lists of lines), checking it uses only `eol` and ends on a blank line."""
    others = {b"\n", b"\r\n", b"\r"} - {eol}
    assert all(other not in body.replace(eol, b"") for other in others), "a foreign line ending"
    assert body.endswith(eol + eol)
    return [block.split(eol) for block in body[: -2 * len(eol)].split(eol + eol)]


def _event_data(lines: list[bytes]) -> str:
    """The event's data lines joined with LF, as an SSE parser reads them."""
    return "\n".join(line[6:].decode() for line in lines if line.startswith(b"data: "))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("line_ending", "\n\n"),
        ("line_ending", "crlf"),
        ("line_ending", 1),
        ("bom", "yes"),
        ("bom", 1),
        ("multiline", 0),
        ("gzip", "true"),
        ("comments", [True]),
    ],
)
def test_framing_keys_are_validated(fake: FakeLLM, http: requests.Session, key: str, value: Any) -> None:
    """Bad framing values are refused both in-process and over /_script."""
    with pytest.raises(ValueError, match=key):
        fake.enqueue(**{key: value})
    resp = http.post(f"{fake.base_url}/_script", json={key: value}, timeout=5)
    assert resp.status_code == 400 and key in resp.json()["error"]["message"]


def test_framing_keys_accept_good_values(fake: FakeLLM) -> None:
    """Every documented value is accepted."""
    for eol in ("\n", "\r\n", "\r"):
        fake.enqueue(line_ending=eol, bom=True, multiline=False, gzip=True, comments=True)


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_line_ending_ends_every_line(fake: FakeLLM, eol: str) -> None:
    """Every line, the blank separators included, ends in the scripted line ending; one event per chunk."""
    _, chunks = _raw_stream(fake, chunks=["一", "二", "三"], line_ending=eol)
    end = eol.encode()
    assert all(chunk.endswith(end * 2) and chunk.count(end * 2) == 1 for chunk in chunks)
    events = _events(b"".join(chunks), end)
    assert all(len(lines) == 1 and lines[0].startswith(b"data: ") for lines in events)
    assert _event_data(events[-1]) == "[DONE]"
    assert _content([json.loads(_event_data(lines)) for lines in events[:-1]]) == "一二三"


def test_bom_starts_the_stream_once(fake: FakeLLM) -> None:
    """bom puts EF BB BF at the very start of the body, and nowhere else."""
    _, chunks = _raw_stream(fake, chunks=["一", "二"], bom=True)
    body = b"".join(chunks)
    assert body.startswith(b"\xef\xbb\xbfdata: {") and body.count(b"\xef\xbb\xbf") == 1
    events = _events(body[3:])
    assert _content([json.loads(_event_data(lines)) for lines in events[:-1]]) == "一二"


def test_multiline_splits_each_json_event(fake: FakeLLM) -> None:
    """multiline sends each JSON event as several data: lines that are valid JSON once joined with LF."""
    _, chunks = _raw_stream(fake, chunks=["一", "二", "三"], multiline=True, usage={"total_tokens": 3})
    events = _events(b"".join(chunks))
    assert events[-1] == [b"data: [DONE]"]
    frames = []
    for lines in events[:-1]:
        assert len(lines) > 3 and all(line.startswith(b"data: ") for line in lines)
        assert not any(line.startswith(b"data: {") and line.endswith(b"}") for line in lines)
        frames.append(json.loads(_event_data(lines)))
    assert _content(frames) == "一二三" and frames[-1]["usage"] == {"total_tokens": 3}
    # Each event still begins with its own compact JSON object once joined.
    assert all(f["object"] == "chat.completion.chunk" for f in frames)


def test_comments_between_events(fake: FakeLLM) -> None:
    """comments puts a `: keep-alive` comment block before every event but the first."""
    _, chunks = _raw_stream(fake, chunks=["一", "二"], comments=True)
    assert chunks[0].startswith(b"data: {")
    assert all(chunk.startswith(b": keep-alive\n\ndata: ") for chunk in chunks[1:])
    events = _events(b"".join(chunks))
    data_events = [lines for lines in events if lines != [b": keep-alive"]]
    assert len(events) - len(data_events) == len(chunks) - 1
    assert _event_data(data_events[-1]) == "[DONE]"
    assert _content([json.loads(_event_data(lines)) for lines in data_events[:-1]]) == "一二"


def test_gzip_is_flushed_per_event(fake: FakeLLM) -> None:
    """gzip: Content-Encoding is set; each chunk decompresses to exactly one whole event; the last ends the stream."""
    headers, chunks = _raw_stream(fake, chunks=["一", "二", "三"], gzip=True)
    assert headers["content-encoding"] == "gzip" and headers["transfer-encoding"] == "chunked"
    assert chunks[0][:2] == b"\x1f\x8b"
    decoder = zlib.decompressobj(wbits=31)
    pieces = [decoder.decompress(chunk) for chunk in chunks]
    assert decoder.eof and decoder.unused_data == b""
    # The final chunk is only the compressor's flush (the gzip trailer); every other one is one event.
    assert pieces[-1] == b""
    assert all(piece.startswith(b"data: ") and piece.endswith(b"\n\n") for piece in pieces[:-1])
    assert pieces[-2] == b"data: [DONE]\n\n"
    assert zlib.decompress(b"".join(chunks), wbits=31) == b"".join(pieces)
    events = _events(b"".join(pieces))
    assert _content([json.loads(_event_data(lines)) for lines in events[:-1]]) == "一二三"


def test_gzip_through_http_client(fake: FakeLLM) -> None:
    """A plain http.client reader gets the gzip body as sent; requests would decode it transparently."""
    fake.enqueue(chunks=["一", "二"], gzip=True, bom=True, line_ending="\r\n")
    conn = HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True})
        conn.request("POST", "/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Encoding") == "gzip"
        decoded = zlib.decompress(resp.read(), wbits=31)
    finally:
        conn.close()
    assert decoded.startswith(b"\xef\xbb\xbfdata: {")
    events = _events(decoded[3:], b"\r\n")
    assert _content([json.loads(_event_data(lines)) for lines in events[:-1]]) == "一二"


def test_all_modes_combined_with_faults(fake: FakeLLM) -> None:
    """Every framing key at once still carries the malformed, overlong, reasoning and no_done faults."""
    _, chunks = _raw_stream(
        fake,
        chunks=["x", "y"],
        reasoning="想",
        no_done=True,
        malformed_after=1,
        overlong_after=2,
        overlong_bytes=20_000,
        line_ending="\r",
        bom=True,
        multiline=True,
        gzip=True,
        comments=True,
    )
    body = zlib.decompress(b"".join(chunks), wbits=31)
    assert body.startswith(b"\xef\xbb\xbfdata: {")
    events = [lines for lines in _events(body[3:], b"\r") if lines != [b": keep-alive"]]
    assert events[2] == [b"data: {not json"]
    overlong = [lines for lines in events if any(len(line) > 10_000 for line in lines)]
    assert len(overlong) == 1 and len(overlong[0]) == 1 and len(overlong[0][0]) == 20_000
    frames = [json.loads(_event_data(lines)) for lines in events if lines != [b"data: {not json"]]
    assert "[DONE]" not in [_event_data(lines) for lines in events]
    reasoning = "".join(f["choices"][0]["delta"].get("reasoning_content", "") for f in frames if f["choices"])
    assert reasoning == "想" and _content(frames) == "xy"


def test_drop_after_with_gzip(fake: FakeLLM, http: requests.Session) -> None:
    """drop_after still cuts a gzip stream mid-body; what arrived decodes to the frames before the cut."""
    fake.enqueue(chunks=["a", "b", "c", "d"], drop_after=2, gzip=True, line_ending="\r\n")
    lines: list[str] = []
    with _chat(http, fake.base_url) as resp, pytest.raises(requests.exceptions.ChunkedEncodingError):
        assert resp.headers["Content-Encoding"] == "gzip"
        for line in resp.iter_lines(decode_unicode=True):
            lines.append(line)
    assert _content(_frames(lines)) == "ab"


def test_hang_after_with_gzip_delivers_frames_before_the_hang(fake: FakeLLM, http: requests.Session) -> None:
    """Thanks to the per-event sync flush, a frame sent before a hang is readable while the stream hangs."""
    fake.enqueue(chunks=["a", "b"], hang_after=1, gzip=True, multiline=True)
    with _chat(http, fake.base_url) as resp:
        decoder = zlib.decompressobj(wbits=31)
        seen = b""
        for chunk in resp.raw.stream(1024, decode_content=False):
            seen += decoder.decompress(chunk)
            if b'"content": "a"' in seen:
                break
        assert b'"content": "a"' in seen
