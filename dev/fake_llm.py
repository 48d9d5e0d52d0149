"""Fake OpenAI-compatible streaming chat upstream for local development and fault-injection tests.

Never shipped to production.  Run standalone with ``python dev/fake_llm.py --port 0 --delay 0.03`` or embed
``FakeLLM`` in tests; both can be scripted (in-process via ``enqueue`` or over HTTP via ``POST /_script``).

Each script (``FakeLLM.enqueue(**script)`` or the JSON body of ``POST /_script``) answers one chat request; an
unscripted request gets the default echo reply.  Keys (all optional):

Reply: ``text`` (split into word-sized pieces) or ``chunks`` (the content pieces, one per frame); ``reasoning``
(streamed first as ``reasoning_content``); ``usage`` (forced usage object; otherwise it is sent only when the
request asks with ``stream_options.include_usage``); ``no_done`` (end without ``data: [DONE]``).

Function calling: ``tool_calls`` -- a list of ``{"name", "arguments" (a JSON string or an object), "id"?}``
streamed after any ``text``/``chunks`` the way DashScope streams them (the first chunk of a call carries its
``id``, ``type`` and ``function.name``; later ones an empty ``id``, no name, and pieces of ``function.arguments``;
the round ends with an empty delta and ``finish_reason: "tool_calls"``). ``tool_calls_interleaved`` -- send the
calls' argument pieces interleaved across calls (index order within each step), as parallel calls may arrive.
Unscripted, a request that offers ``tools`` (and no ``tool_choice: "none"``) gets a call when its last user
message asks for what a tool answers (weather, news, the time, "我上次跟谁聊的"); a request whose last message
is a tool result gets a reply built on those results.

Timing: ``delay`` (seconds before each reasoning or content frame; the server default otherwise), ``first_byte_delay``
(before the status line), ``headers_then_delay`` (after the headers, before the first frame).

Faults: ``status`` + ``body`` (a non-200 reply with that JSON object or plain-text body); after N frames
``malformed_after`` (a ``data: {not json`` event), ``overlong_after`` (a valid event whose single ``data:``
line is ``overlong_bytes`` long), ``drop_after`` (cut the connection mid-body), ``hang_after`` (stall until the
client leaves or the server stops).

SSE framing of a streamed reply (every fault above still applies; a non-stream or error reply is unaffected):
``line_ending`` -- ``"\\n"`` (default), ``"\\r\\n"`` or ``"\\r"``, ending every line of every event, the blank
separator line included; ``bom`` -- the body starts with a UTF-8 BOM (``EF BB BF``); ``multiline`` -- each JSON
event is pretty-printed (``json.dumps(indent=1)``) and sent as one ``data:`` line per line, so it is valid JSON
again once the lines are joined with ``"\\n"`` (the malformed and overlong events stay one line);
``comments`` -- a ``: keep-alive`` comment block (the comment line plus a blank line) before every event but
the first; ``gzip`` -- ``Content-Encoding: gzip``, the body compressed as one gzip stream that is sync-flushed
after every event (so events still arrive one by one) and finished with the compressor's final flush.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATHS = frozenset({"/chat/completions", "/v1/chat/completions", "/compatible-mode/v1/chat/completions"})

_INT_KEYS = ("status", "drop_after", "malformed_after", "overlong_after", "hang_after", "overlong_bytes")
_FLOAT_KEYS = ("delay", "first_byte_delay", "headers_then_delay")
_BOOL_KEYS = ("bom", "multiline", "gzip", "comments", "tool_calls_interleaved")
SCRIPT_KEYS = frozenset(
    _INT_KEYS
    + _FLOAT_KEYS
    + _BOOL_KEYS
    + ("body", "text", "chunks", "no_done", "reasoning", "usage", "line_ending", "tool_calls")
)
LINE_ENDINGS = ("\n", "\r\n", "\r")
DEFAULT_OVERLONG_BYTES = 2_000_000
MALFORMED_FRAME = b"data: {not json\n\n"
MALFORMED_LINE = MALFORMED_FRAME.rstrip(b"\n")
BOM = b"\xef\xbb\xbf"
KEEP_ALIVE_LINE = b": keep-alive"

# ASCII words (with their leading space) or 1-3 other characters per frame, like a tokenizer would.
_PIECE_RE = re.compile(r"\s*[A-Za-z0-9_'-]+|\s*[^\sA-Za-z0-9_'-]{1,3}|\s+")


def _dumps(obj: Any) -> str:
    """Serialize compactly with non-ASCII kept as-is, as DashScope does."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def split_pieces(text: str) -> list[str]:
    """Split text into word-sized / few-character pieces whose concatenation is the original text."""
    return _PIECE_RE.findall(text)


def validate_script(script: Any) -> dict[str, Any]:
    """Check a script's keys and value types, raising ValueError on anything a test author likely mistyped."""
    if not isinstance(script, dict):
        raise ValueError("script must be a JSON object")
    unknown = set(script) - SCRIPT_KEYS
    if unknown:
        raise ValueError(f"unknown script keys: {sorted(unknown)}")
    for key in _INT_KEYS:
        value = script.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be a non-negative int")
    for key in _FLOAT_KEYS:
        value = script.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{key} must be a non-negative number")
    for key in ("text", "reasoning"):
        if script.get(key) is not None and not isinstance(script[key], str):
            raise ValueError(f"{key} must be a string")
    chunks = script.get("chunks")
    if chunks is not None and (not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks)):
        raise ValueError("chunks must be a list of strings")
    if script.get("usage") is not None and not isinstance(script["usage"], dict):
        raise ValueError("usage must be an object")
    if script.get("body") is not None and not isinstance(script["body"], (dict, list, str)):
        raise ValueError("body must be a JSON object or a string")
    for key in _BOOL_KEYS:
        if script.get(key) is not None and not isinstance(script[key], bool):
            raise ValueError(f"{key} must be a boolean")
    if script.get("line_ending") is not None and script["line_ending"] not in LINE_ENDINGS:
        raise ValueError(f"line_ending must be one of {list(LINE_ENDINGS)}")
    calls = script.get("tool_calls")
    if calls is not None and (
        not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls)
    ):
        raise ValueError("tool_calls must be a list of objects with a name")
    return dict(script)


# What the unscripted stand-in model calls a tool for (the first pattern that matches the user's words).
_INTENTS = (
    ("get_weather", re.compile(r"天气|气温|下雨|下雪|冷不冷|热不热|穿什么|温度")),
    ("get_hot_news", re.compile(r"新闻|热搜|热点|八卦|热榜")),
    ("recall_recent_chats", re.compile(r"上次.*聊|跟谁聊|和谁聊|聊过谁|最近.*聊")),
    ("get_current_time", re.compile(r"几号|几点|星期几|周几|礼拜几|日期|今天.*号")),
)
_KNOWN_CITIES = ("杭州", "北京", "上海", "广州", "深圳", "成都", "南京", "武汉", "西安", "重庆", "天津", "苏州")
_CITY_RE = re.compile(r"([\u4e00-\u9fa5]{2,4}?)(?:市)?(?:现在|今天|明天|后天|这几天)?的?(?:天气|气温)")


def _city(text: str, fallback: str = "杭州") -> str:
    for city in _KNOWN_CITIES:
        if city in text:
            return city
    match = _CITY_RE.search(text)
    if match and match.group(1) not in ("现在", "今天", "明天", "后天", "那边", "这边", "外面"):
        return match.group(1)
    return fallback


def tool_plan(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The calls the stand-in model makes for this request, if any (see the module docstring)."""
    tools = body.get("tools")
    messages = body.get("messages")
    if not isinstance(tools, list) or body.get("tool_choice") == "none" or not isinstance(messages, list):
        return None
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        return None
    offered = {t.get("function", {}).get("name") for t in tools if isinstance(t, dict)}
    text, _ = _message_text(messages[-1].get("content"))
    for name, pattern in _INTENTS:
        if name in offered and pattern.search(text):
            if name == "get_weather":
                if re.search(r"明天|后天", text) and _earlier_weather(messages):
                    return None  # the earlier result already holds the forecast
                return [{"name": name, "arguments": {"city": _city(text)}}]
            if name == "get_hot_news":
                return [{"name": name, "arguments": {"limit": 5}}]
            return [{"name": name, "arguments": {}}]
    return None


def _tool_results(messages: list[Any]) -> list[dict[str, Any]]:
    """The results of the tool messages at the end of the context (this round's)."""
    results = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        try:
            results.insert(0, json.loads(message.get("content") or "{}"))
        except ValueError:
            results.insert(0, {"ok": False, "error": "unreadable"})
    return results


def _earlier_weather(messages: list[Any]) -> dict[str, Any] | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "tool":
            try:
                result = json.loads(message.get("content") or "{}")
            except ValueError:
                continue
            if isinstance(result.get("data"), dict) and "forecast" in result["data"]:
                return result["data"]
    return None


def answer_from_tools(messages: Any) -> str | None:
    """A reply built on tool results (this round's, or an earlier weather forecast for "明天呢")."""
    if not isinstance(messages, list) or not messages:
        return None
    parts: list[str] = []
    for result in _tool_results(messages):
        data = result.get("data") if isinstance(result.get("data"), dict) else {}
        if not result.get("ok"):
            parts.append(f"工具没能查到（{result.get('error')}）。")
        elif "now" in data:
            now = data["now"]
            parts.append(f"{data.get('city')}现在{now.get('weather')}，{now.get('temperature_c')}°C。")
        elif "items" in data:
            titles = "；".join(item["title"] for item in data["items"][:3])
            parts.append(f"现在大家在聊：{titles}。")
        elif "chats" in data:
            names = "、".join(chat["role_name"] for chat in data["chats"]) or "没有别人"
            parts.append(f"你最近聊过的是：{names}。")
        elif "weekday" in data:
            parts.append(f"今天是{data['date']}，{data['weekday']}，现在{data['time']}。")
        else:
            parts.append("我查到了一些结果。")
    if not parts:
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        text, _ = _message_text(last.get("content")) if last.get("role") == "user" else ("", 0)
        earlier = _earlier_weather(messages) if re.search(r"明天|后天", text) else None
        if not earlier:
            return None
        day = earlier["forecast"][2 if "后天" in text else 1] if len(earlier.get("forecast", [])) > 2 else None
        if day is None:
            return None
        parts.append(
            f"{earlier.get('city')}{'后天' if '后天' in text else '明天'}白天{day['day_weather']}，"
            f"夜里{day['night_weather']}，{day['low_c']}到{day['high_c']}°C。"
        )
    return "（本地替身模型）" + "".join(parts)


def _message_text(content: Any) -> tuple[str, int]:
    """Return the text of a message content (string or multimodal part list) and its number of images."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") in ("image_url", "image", "input_image"):
            images += 1
    return " ".join(texts), images


def default_reply(messages: Any, limit: int = 40) -> str:
    """Build the plainly-labelled stand-in reply that echoes a shortened form of the last user message."""
    text, images = "", 0
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                text, images = _message_text(message.get("content"))
                break
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "…"
    parts = ["（本地替身模型）"]
    parts.append(f"你说的是：「{text}」。" if text else "没有收到文字消息。")
    if images:
        parts.append(f"我还收到了{images}张图片，但替身模型看不懂图片。")
    parts.append("这是本地开发用的模拟回复，不是真实的大模型。")
    return "".join(parts)


def _prompt_chars(messages: Any) -> int:
    """Count prompt characters as a stand-in for prompt tokens."""
    if not isinstance(messages, list):
        return 0
    return sum(len(_message_text(m.get("content"))[0]) for m in messages if isinstance(m, dict))


class _Framer:
    """Turns the lines of each SSE event into body bytes per a script's framing keys and writes them out."""

    def __init__(self, script: dict[str, Any], write: Callable[[bytes], None]) -> None:
        """Read the framing keys; `write` sends one piece of the body (never called with b"")."""
        self._write = write
        self._eol = (script.get("line_ending") or "\n").encode()
        self.multiline = bool(script.get("multiline"))
        self._comments = bool(script.get("comments"))
        self._bom = bool(script.get("bom"))
        self.gzip = bool(script.get("gzip"))
        self._compressor = zlib.compressobj(wbits=31) if self.gzip else None
        self._events = 0

    def json_event(self, obj: Any) -> None:
        """Send one `data:` event carrying obj as JSON (pretty-printed over several lines when multiline)."""
        text = json.dumps(obj, ensure_ascii=False, indent=1) if self.multiline else _dumps(obj)
        self.event([b"data: " + line.encode() for line in text.split("\n")])

    def event(self, lines: list[bytes]) -> None:
        """Send one event made of `lines` (without line endings), then its blank separator line."""
        data = b""
        if self._events == 0 and self._bom:
            data += BOM
        if self._events > 0 and self._comments:
            data += KEEP_ALIVE_LINE + self._eol + self._eol
        data += b"".join(line + self._eol for line in lines) + self._eol
        self._events += 1
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._write(data)

    def finish(self) -> None:
        """End the body's encoding (the gzip trailer); the caller then sends the terminating chunk."""
        if self._compressor is not None:
            tail = self._compressor.flush()
            if tail:
                self._write(tail)


class _Abort(Exception):
    """Raised inside a handler to end a response early because the client left or the server is stopping."""


class _Server(ThreadingHTTPServer):
    """Threading HTTP server that tracks live connections and handler threads so stop() can end them."""

    daemon_threads = True
    # socketserver's default backlog of 5 refuses bursts of concurrent connections (load tests, 30 users at once).
    request_queue_size = 128
    block_on_close = False

    def __init__(self, address: tuple[str, int], fake: FakeLLM) -> None:
        """Bind the listening socket and remember the owning FakeLLM."""
        super().__init__(address, _Handler)
        self.fake = fake
        self._track_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve each connection on its own tracked daemon thread."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="fake-llm-conn",
            daemon=True,
        )
        with self._track_lock:
            self._conns.add(request)
            self._handler_threads = {t for t in self._handler_threads if t.is_alive()}
            self._handler_threads.add(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        """Forget a connection once its handler is done with it."""
        with self._track_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that vanish; still report real bugs."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self, timeout: float) -> None:
        """Shut down every open connection and wait for the handler threads to finish."""
        with self._track_lock:
            conns = list(self._conns)
            threads = list(self._handler_threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    """Request handler implementing the chat completions endpoint and the /_ control endpoints."""

    protocol_version = "HTTP/1.1"
    # Frames are small separate writes; Nagle + delayed ACK would add ~40 ms stalls and skew latency numbers.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing, so tests and dev servers stay quiet."""

    @property
    def fake(self) -> FakeLLM:
        """Return the FakeLLM that owns this server."""
        return self.server.fake

    def _route(self) -> str:
        """Return the request path without its query string."""
        return self.path.split("?", 1)[0]

    def do_GET(self) -> None:
        """Serve GET /_requests."""
        if self._route() == "/_requests":
            self._send_json(200, self.fake.requests)
        else:
            self._send_json(404, _error_body("not found", "not_found"))

    def do_POST(self) -> None:
        """Dispatch POST to the chat endpoint or the control endpoints."""
        route = self._route()
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        if route == "/_script":
            try:
                script = validate_script(json.loads(raw or b"null"))
            except ValueError as exc:
                self._send_json(400, _error_body(str(exc), "invalid_script"))
                return
            self.fake.enqueue(**script)
            self._send_json(200, {"ok": True})
        elif route == "/_reset":
            self.fake.reset()
            self._send_json(200, {"ok": True})
        elif route in CHAT_PATHS:
            self._chat(raw)
        else:
            self._send_json(404, _error_body("not found", "not_found"))

    def _read_body(self) -> bytes:
        """Read the request body, whether sized by Content-Length or chunked."""
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return b""
        data = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Skip any trailers up to the blank line.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline()

    def _chat(self, raw: bytes) -> None:
        """Record a chat request and answer it per the next queued script (or the default reply)."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = None
        self.fake._record(self._route(), self.headers.get("Authorization"), body)
        script = self.fake._next_script()
        try:
            self._pause(script.get("first_byte_delay", 0))
            status = script.get("status", 200)
            if status != 200:
                self._send_scripted_error(status, script.get("body"))
            elif body is None:
                self._send_json(400, _error_body("request body is not a JSON object", "invalid_request_error"))
            elif body.get("stream"):
                self._stream(body, script)
            else:
                self._send_json(200, self._completion(body, script))
        except (_Abort, OSError):
            # Client went away or the server is stopping: just end, without a traceback.
            self.close_connection = True

    def _pause(self, seconds: float) -> None:
        """Wait, raising _Abort as soon as the server stops or the client hangs up."""
        if self.fake._stopping.is_set():
            raise _Abort
        if seconds <= 0:
            return
        conn = self.connection
        deadline = time.monotonic() + seconds
        while True:
            if self.fake._stopping.is_set():
                raise _Abort
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            step = min(remaining, 0.1)
            previous = conn.gettimeout()
            # Peeking with a timeout (rather than select) detects a closed client without an fd-count limit.
            conn.settimeout(step)
            try:
                peeked = conn.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError:
                raise _Abort from None
            finally:
                conn.settimeout(previous)
            if not peeked:
                raise _Abort
            # The client sent more bytes (pipelining); they are not ours to read, so just sleep.
            self.fake._stopping.wait(step)

    def _send_json(self, status: int, obj: Any) -> None:
        """Send a complete JSON response with Content-Length."""
        self._send_bytes(status, _dumps(obj).encode(), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        """Send a complete non-streamed response."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_scripted_error(self, status: int, body: Any) -> None:
        """Send the scripted error status with its JSON or plain-text body."""
        if body is None:
            body = _error_body(f"fake upstream error {status}", "fake_error", str(status))
        if isinstance(body, str):
            self._send_bytes(status, body.encode(), "text/plain; charset=utf-8")
        else:
            self._send_json(status, body)

    def _texts(self, body: dict[str, Any], script: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Return the reasoning pieces and the content pieces for this reply."""
        if script.get("chunks") is not None:
            content = list(script["chunks"])
        elif script.get("text") is not None:
            content = split_pieces(script["text"])
        elif script.get("tool_calls") is not None:
            content = []
        else:
            from_tools = answer_from_tools(body.get("messages"))
            content = split_pieces(from_tools or default_reply(body.get("messages")))
        reasoning = split_pieces(script.get("reasoning") or "")
        return reasoning, content

    def _usage(self, body: dict[str, Any], script: dict[str, Any], completion_chars: int) -> dict[str, Any]:
        """Return the scripted usage, or character counts standing in for token counts."""
        if script.get("usage") is not None:
            return script["usage"]
        prompt = _prompt_chars(body.get("messages"))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_chars,
            "total_tokens": prompt + completion_chars,
        }

    def _completion(self, body: dict[str, Any], script: dict[str, Any]) -> dict[str, Any]:
        """Build a non-streamed chat.completion object."""
        reasoning, content = self._texts(body, script)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        completion_chars = len("".join(reasoning)) + len(message["content"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "fake-llm",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": self._usage(body, script, completion_chars),
            "x_sent_at": time.time(),
        }

    def _send_chunk(self, data: bytes) -> None:
        """Write one HTTP/1.1 chunk (an empty one terminates the body) and flush it."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, body: dict[str, Any], script: dict[str, Any]) -> None:
        """Stream the reply as OpenAI chat.completion.chunk SSE frames, applying any scripted faults."""
        reasoning, content = self._texts(body, script)
        delay = script.get("delay", self.fake.delay)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model") or "fake-llm",
        }

        framer = _Framer(script, self._send_chunk)

        def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            framer.json_event({**base, "choices": choices, **extra, "x_sent_at": time.time()})

        calls = script.get("tool_calls")
        if calls is None and not script:
            calls = tool_plan(body)
            if calls:
                content = []
        frames: list[tuple[dict[str, Any], str | None]] = [({"reasoning_content": p}, None) for p in reasoning]
        frames += [({"content": p}, None) for p in content]
        if calls:
            frames += [(delta, None) for delta in _call_deltas(calls, bool(script.get("tool_calls_interleaved")))]
            frames.append(({}, "tool_calls"))
        elif content:
            frames[-1] = (frames[-1][0], "stop")
        else:
            frames.append(({}, "stop"))
        total = len(frames)

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if framer.gzip:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self._pause(script.get("headers_then_delay", 0))
        event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        self._inject(script, 0, total, base, framer)
        for sent, (delta, finish_reason) in enumerate(frames, start=1):
            self._pause(delay)
            event([{"index": 0, "delta": delta, "finish_reason": finish_reason}])
            self._inject(script, sent, total, base, framer)
        stream_options = body.get("stream_options")
        wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        if wants_usage or script.get("usage") is not None:
            completion_chars = len("".join(reasoning)) + len("".join(content))
            event([], usage=self._usage(body, script, completion_chars))
        if not script.get("no_done"):
            framer.event([b"data: [DONE]"])
        framer.finish()
        self._send_chunk(b"")

    def _inject(self, script: dict[str, Any], sent: int, total: int, base: dict[str, Any], framer: _Framer) -> None:
        """Apply the faults scripted to happen after `sent` frames (counts beyond the end clip to the end)."""

        def due(key: str) -> bool:
            return script.get(key) is not None and min(script[key], total) == sent

        if due("malformed_after"):
            framer.event([MALFORMED_LINE])
        if due("overlong_after"):
            framer.event([_overlong_line(base, script.get("overlong_bytes", DEFAULT_OVERLONG_BYTES))])
        if due("drop_after"):
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            raise _Abort
        if due("hang_after"):
            self._pause(math.inf)


def _call_deltas(calls: list[dict[str, Any]], interleaved: bool) -> list[dict[str, Any]]:
    """DashScope's streamed tool-call deltas: per call a head chunk (id, type, name, no arguments yet) and
    argument pieces with an empty id and no name; one call after another, or interleaved."""
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(calls):
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = _dumps(arguments)
        call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": call["name"], "arguments": ""}}
        pieces = [arguments[i : i + 7] for i in range(0, len(arguments), 7)] or [""]
        tail = [{"index": index, "id": "", "type": "function", "function": {"arguments": p}} for p in pieces]
        per_call.append([head, *tail])
    if interleaved:
        steps = max(len(c) for c in per_call)
        ordered = [c[i] for i in range(steps) for c in per_call if i < len(c)]
    else:
        ordered = [chunk for c in per_call for chunk in c]
    deltas = []
    for position, chunk in enumerate(ordered):
        delta: dict[str, Any] = {"tool_calls": [chunk]}
        if position == 0:
            delta = {"role": "assistant", "content": None, **delta}
        deltas.append(delta)
    return deltas


def _overlong_line(base: dict[str, Any], size: int) -> bytes:
    """Return a valid `data:` line of exactly `size` bytes (without its line ending), padded in an extra field."""
    frame = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": None}], "x_padding": ""}
    head = f"data: {_dumps(frame)}".encode()
    padding = max(0, size - len(head))
    frame["x_padding"] = "x" * padding
    return f"data: {_dumps(frame)}".encode()


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    """Build an OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "code": code or type_}}


class FakeLLM:
    """In-process fake OpenAI-compatible chat upstream with a FIFO of fault-injection scripts."""

    def __init__(self, *, delay: float = 0.03, host: str = "127.0.0.1", port: int = 0) -> None:
        """Configure (but do not start) the fake; port 0 picks a free port at start()."""
        self.delay = delay
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._scripts: deque[dict[str, Any]] = deque()
        self._requests: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeLLM:
        """Bind and serve on a background daemon thread; returns self for chaining."""
        if self._httpd is not None:
            raise RuntimeError("FakeLLM already started")
        self._stopping.clear()
        httpd = _Server((self.host, self.port), self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-llm-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving, cut open connections (including hanging streams) and join all threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        if thread is not None:
            thread.join(timeout)
        httpd.close_connections(timeout)
        httpd.server_close()
        self._httpd = self._thread = None

    def __enter__(self) -> FakeLLM:
        """Start on entering a with-block."""
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        """Stop on leaving a with-block."""
        self.stop()

    @property
    def base_url(self) -> str:
        """Return the URL clients prefix to /chat/completions."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Return a snapshot of the recorded chat requests ({"path", "headers", "body"})."""
        with self._lock:
            return list(self._requests)

    def enqueue(self, **script: Any) -> None:
        """Queue a script for the next chat request not yet claimed by an earlier script."""
        checked = validate_script(script)
        with self._lock:
            self._scripts.append(checked)

    def reset(self) -> None:
        """Drop queued scripts and recorded requests."""
        with self._lock:
            self._scripts.clear()
            self._requests.clear()

    def _record(self, path: str, authorization: str | None, body: dict[str, Any] | None) -> None:
        """Append one chat request to the record."""
        with self._lock:
            self._requests.append({"path": path, "headers": {"Authorization": authorization}, "body": body})

    def _next_script(self) -> dict[str, Any]:
        """Pop the next queued script, or an empty one meaning the default reply."""
        with self._lock:
            return self._scripts.popleft() if self._scripts else {}


def main(argv: list[str] | None = None) -> int:
    """Run the fake standalone until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible streaming chat upstream (dev only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.03, help="seconds between frames")
    args = parser.parse_args(argv)

    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    fake = FakeLLM(delay=args.delay, host=args.host, port=args.port).start()
    print(f"fake-llm listening on {fake.base_url}", flush=True)
    try:
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not done.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
