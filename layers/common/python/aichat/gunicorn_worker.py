"""gunicorn's gthread worker with two changes: its own error answers are the contract's JSON, and a request
reaches a thread only once its whole head (request line and headers) has arrived.

gunicorn answers a request it cannot parse (a request line over 4094 bytes, oversized or malformed
headers, a bad Content-Length, an unknown Expect, HTTP/0.9 …) before the app sees it, with an HTML page;
here that page is `{"success":false,"code":…,"message":…}` with a 4xx status instead.

Stock gthread hands a connection to a thread as soon as its first byte arrives, and the thread then blocks
reading the rest of the head: 40 clients sending a byte a second hold every thread. Here the main loop
gathers each head without blocking (the event loop gthread already runs), and cuts a client that has not
sent it within AICHAT_HEADER_TIMEOUT with a 408. FC's gateway shields a deployed function from such
clients anyway; `make run` and any self-hosting are not shielded. Used by gunicorn_conf.py everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.workers.gthread import TConn, ThreadWorker

# The longest a client may take to send its request line and headers (FC's gateway sends them at once).
HEADER_TIMEOUT_S = float(os.environ.get("AICHAT_HEADER_TIMEOUT", "10"))
# gunicorn's statuses for requests it refuses -> (the contract's code, HTTP status we answer, message).
_ANSWERS = {
    400: ("InvalidInput", 400, "请求格式不正确"),
    403: ("InvalidInput", 403, "请求被拒绝"),
    408: ("InvalidInput", 408, "请求头发送超时"),
    414: ("InvalidInput", 414, "请求行过长（上限 4094 字节）"),
    417: ("InvalidInput", 417, "不支持的 Expect 请求头"),
    431: ("InvalidInput", 431, "请求头过大或过多"),
    501: ("InvalidInput", 400, "不支持的 Transfer-Encoding"),
}
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def error_bytes(status_int: int) -> bytes:
    """A whole HTTP/1.1 response: the contract's error JSON for a request gunicorn refused."""
    code, status, message = _ANSWERS.get(status_int, ("InternalError", 500, "服务内部异常"))
    body = json.dumps({"success": False, "code": code, "message": message}, ensure_ascii=False, separators=(",", ":"))
    body = body.encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error, answering JSON (the parse error's text is never echoed back)."""
    util.write_nonblock(sock, error_bytes(status_int))


# Every error page gunicorn writes in this process goes through here.
util.write_error = write_json_error


class _Held:
    """Takes what gunicorn would send (a response head), to send it later with the body."""

    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


class SizedResponse(wsgi.Response):
    """gunicorn's response, sending a sized response's head with its body in one write (one TCP segment
    for a small answer) instead of two: each write gives up the GIL and queues to get it back behind the
    busy threads. A stream's head (chunked, no Content-Length) still goes at once."""

    _held = b""

    def send_headers(self) -> None:
        if self.headers_sent or self.chunked or self.response_length is None:
            return super().send_headers()
        sock, self.sock = self.sock, _Held()
        try:
            super().send_headers()
        finally:
            self._held, self.sock = self.sock.data, sock
        return None

    def _flush_head(self) -> None:
        if self._held:
            head, self._held = self._held, b""
            util.write(self.sock, head)

    def _emit_body(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        super()._emit_body(data)

    def sendfile(self, respiter: Any) -> bool:
        self.send_headers()
        self._flush_head()  # the file goes by sendfile(2), after its head
        return super().sendfile(respiter)

    def close(self) -> None:
        self.send_headers()
        self._flush_head()  # an answer without body bytes (204, 304, HEAD)
        super().close()


wsgi.Response = SizedResponse  # what gunicorn's wsgi.create() builds for every request in this process


# A head larger than this is handed to gunicorn as it is, which refuses it (414 / 431).
MAX_HEAD_BYTES = 4094 + 8190 + 256


class Worker(ThreadWorker):
    """gthread, gathering each request head in the main loop before a thread takes the request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gathering: dict[Any, float] = {}  # connection -> deadline for its head

    def accept(self, listener: Any) -> None:
        """A new connection: gather its head first (stock gthread submits it to a thread at once)."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._gather(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection sends its next request: gather that head too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._gather(conn)

    def _gather(self, conn: Any) -> None:
        conn.sock.setblocking(False)
        conn.aichat_head = b""
        self._gathering[conn] = time.monotonic() + HEADER_TIMEOUT_S
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn: Any, client: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was complete
            self._drop(conn)
            return
        conn.aichat_head += data
        if b"\r\n\r\n" in conn.aichat_head or b"\n\n" in conn.aichat_head or len(conn.aichat_head) > MAX_HEAD_BYTES:
            self.poller.unregister(conn.sock)
            del self._gathering[conn]
            conn.data_ready = True
            self.enqueue_req(conn)

    def _drop(self, conn: Any, answer: bytes = b"") -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self._gathering.pop(conn, None)
        if answer:
            with contextlib.suppress(OSError):
                conn.sock.setblocking(True)
                conn.sock.settimeout(1)
                conn.sock.sendall(answer)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gthread's timeouts, and ours: a head not complete in time is answered 408 and the connection cut."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c, due in self._gathering.items() if due <= now]:
            self._drop(conn, error_bytes(408) if conn.aichat_head else b"")

    def handle(self, conn: Any) -> Any:
        """Serve the request whose head was gathered: the parser reads it back before the socket."""
        head = getattr(conn, "aichat_head", b"")
        if head:
            conn.aichat_head = b""
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(head)
        return super().handle(conn)
