"""An OpenAI-compatible streaming client over requests (DashScope compatible-mode by default)."""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ApiError
from .sse import EventParser, EventTooLong, dumps

if TYPE_CHECKING:
    import requests

log = logging.getLogger("aichat.llm")

# Frames longer than this are not a chat delta; refusing them bounds memory per stream.
MAX_FRAME_BYTES = 1024 * 1024
READ_SIZE = 64 * 1024


class StreamBroken(Exception):
    """The upstream stream failed after it started; `code` is the contract error code to report."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# What next_event() answers at the end of the stream ([DONE] or the end of the body).
END = object()


class UpstreamStream:
    """An open upstream SSE response, read event by event with no buffering beyond what has arrived.

    Reads happen on the caller's thread (no thread per stream: a frame reaches the client with no
    hand-off); a wait can be bounded, so the caller learns of a silence and can act on it (heartbeats,
    probes, its time bound) without breaking the HTTP reader's state.
    """

    def __init__(self, response: requests.Response) -> None:
        self._response = response
        self._parser = EventParser(max_event_bytes=MAX_FRAME_BYTES)
        self._pending: deque[bytes] = deque()
        self.done = False  # the upstream sent data: [DONE]
        self.ended = False  # nothing more will come ([DONE], or the body ended)

    def next_event(self, timeout: float | None = None) -> bytes | object | None:
        """The next event's data (the payload after `data:`); None when nothing arrived within `timeout`
        seconds (None: wait as long as the read timeout allows); END once the stream is over.

        Raises StreamBroken on a dropped connection, a read timeout or an overlong event.
        """
        while not self._pending:
            if self.ended:
                return END
            if timeout is not None and not self._ready(timeout):
                return None
            try:
                # read1 returns whatever has arrived (at most one chunk) instead of waiting for a full block;
                # decode_content undoes a Content-Encoding an upstream applied despite `identity`.
                chunk = self._response.raw.read1(READ_SIZE, decode_content=True)
            except Exception as exc:  # requests / urllib3 / http.client errors on a dropped or timed-out socket
                raise _broken(exc) from exc
            if not chunk:
                self.ended = True
                return END
            try:
                events = self._parser.feed(chunk)
            except EventTooLong as exc:
                raise StreamBroken("UpstreamHTTPError", "upstream frame too long") from exc
            for payload in events:
                if payload.strip() == b"[DONE]":
                    self.done = self.ended = True
                    break
                self._pending.append(payload)
        return self._pending.popleft()

    def frames(self) -> Iterator[bytes]:
        """Every event's data until the end (blocking reads)."""
        while (event := self.next_event()) is not END:
            yield event  # type: ignore[misc]

    def _ready(self, timeout: float) -> bool:
        """Whether a read would find data now or within `timeout`: buffered above the socket, or on it."""
        raw = self._response.raw
        if len(getattr(raw, "_decoded_buffer", b"")) > 0:
            return True  # urllib3 holds decoded bytes already
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if sock is None:
            return True  # not an inspectable connection: read as usual (the read timeout still applies)
        pending = getattr(sock, "pending", None)  # TLS: bytes decrypted but not read yet
        if (pending is not None and pending() > 0) or select.select([sock], [], [], 0)[0]:
            return True
        if _buffered(getattr(raw, "_fp", None), sock):
            return True  # http.client's buffer holds the next bytes
        return bool(select.select([sock], [], [], timeout)[0])

    def close(self) -> None:
        """Release the upstream connection (closing it if the body was not read to the end)."""
        self._response.close()

    def abort(self) -> None:
        """Cut the upstream connection from another thread, so a read blocked on it returns at once."""
        sock = getattr(getattr(self._response.raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _buffered(reader: Any, sock: socket.socket) -> bool:
    """Whether http.client's buffer over `sock` already holds what its next read returns, found without
    blocking: with the socket non-blocking, peek() answers what is buffered (an empty socket reads as
    "would block"). In a chunked body the buffer must hold a whole chunk-size line and some data after
    it (the CRLF that ends the previous chunk alone is not enough: the read would wait on the socket)."""
    fp = getattr(reader, "fp", None)
    if fp is None or not hasattr(fp, "peek"):
        return False
    previous = sock.gettimeout()
    try:
        sock.setblocking(False)
        data = fp.peek(1)
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    if not data or not getattr(reader, "chunked", False) or getattr(reader, "chunk_left", None):
        return bool(data)  # not chunked, or inside a chunk: any byte is a result
    if getattr(reader, "chunk_left", None) == 0:  # the previous chunk's CRLF comes first
        if len(data) < 2:
            return False
        data = data[2:]
    line_end = data.find(b"\n")
    if line_end < 0:
        return False
    last_chunk = data[:line_end].split(b";", 1)[0].strip() == b"0"
    return last_chunk or len(data) > line_end + 1


def _broken(exc: BaseException) -> StreamBroken:
    name = type(exc).__name__
    timeout = "Timeout" in name or "timed out" in str(exc)
    return StreamBroken("NetworkError", f"upstream read {'timed out' if timeout else 'failed'} ({name})")


class LlmClient:
    """Opens streaming chat completions against `{base_url}/chat/completions` with explicit timeouts."""

    def __init__(self, *, base_url: str, api_key: str, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = (connect_timeout_s, read_timeout_s)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        # One keep-alive session per thread: repeated streams skip the TCP/TLS handshake to the upstream.
        session = getattr(self._local, "session", None)
        if session is None:
            import requests  # loaded on the first stream (or by preload()), not at instance start

            session = self._local.session = requests.Session()
            # The upstream is configured explicitly; scanning proxy/netrc settings per request costs time.
            session.trust_env = False
        return session

    def open_stream(self, payload: dict[str, Any]) -> UpstreamStream:
        """Send the request and return the stream once the upstream has answered 2xx.

        Before any frame: non-2xx → 502 UpstreamHTTPError naming the status; connect/read failure →
        NetworkError (504 on timeout, else 502).
        """
        if not self.api_key:
            raise ApiError("MissingApiKey")
        session = self._session()
        import requests

        try:
            response = session.post(
                f"{self.base_url}/chat/completions",
                # Serialised once, with CJK as UTF-8 (requests' json= would \u-escape it: up to 3x the bytes).
                data=dumps({**payload, "stream": True}),
                headers={
                    "Authorization": f"Bearer {self.api_key}",
                    "Content-Type": "application/json",
                    "Accept": "text/event-stream",
                    # A compressed SSE body would sit in the decoder instead of flowing through.
                    "Accept-Encoding": "identity",
                },
                stream=True,
                timeout=self.timeout,
            )
        except requests.exceptions.Timeout as exc:
            log.warning("upstream timed out before answering", extra={"error": type(exc).__name__})
            raise ApiError("NetworkError", "上游模型响应超时", status=504) from exc
        except requests.exceptions.RequestException as exc:
            log.warning("upstream unreachable", extra={"error": type(exc).__name__})
            raise ApiError("NetworkError", "无法连接上游模型") from exc
        if not 200 <= response.status_code < 300:
            detail = _error_detail(response)
            response.close()
            log.warning("upstream refused", extra={"upstream_status": response.status_code, "detail": detail})
            raise ApiError("UpstreamHTTPError", f"上游模型 HTTP 错误: {response.status_code}")
        return UpstreamStream(response)


def preload() -> None:
    """Import the HTTP client now (FC's initializer) so the first stream does not pay for it."""
    import requests  # noqa: F401


def _error_detail(response: requests.Response) -> str:
    """A short, log-safe description of an upstream error body (read at most 4 KiB of it)."""
    try:
        raw = response.raw.read(4096, decode_content=True) or b""
        body = json.loads(raw.decode("utf-8", errors="replace"))
    except Exception:  # noqa: BLE001 - the detail is only for the log
        return ""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return f"{str(error.get('code') or error.get('type') or '')[:100]} {str(error.get('message', ''))[:200]}"
    return str(error)[:300]
