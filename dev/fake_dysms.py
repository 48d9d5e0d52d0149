"""A fake Alibaba Cloud Dysmsapi (SendSms only) on loopback, for tests and local runs; never shipped."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger("fake_dysms")

MODES = frozenset({"ok", "business_error", "http_500", "hang"})

_BUSINESS_MESSAGES = {
    "isv.BUSINESS_LIMIT_CONTROL": "触发分钟级流控Permits:1",
    "isv.MOBILE_NUMBER_ILLEGAL": "非法手机号",
    "isv.MOBILE_COUNT_OVER_LIMIT": "手机号码数量超过限制",
}

# ACS3 (V3) signatures carry the key id in the Authorization header: "... Credential=<id>,SignedHeaders=...".
_CREDENTIAL_RE = re.compile(r"Credential=([^,\s]+)")


class _Server(ThreadingHTTPServer):
    """Threading server that joins its handler threads on close and ignores clients that hung up."""

    daemon_threads = False
    # socketserver's default backlog of 5 refuses bursts of concurrent connections (load tests, 30 users at once).
    request_queue_size = 128
    block_on_close = True
    fake: FakeDysms

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client gave up (e.g. timed out during a hang); log anything else."""
        logger.debug("fake dysms: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Answers SendSms the way Dysmsapi does, as driven by the owning FakeDysms."""

    server: _Server
    # HTTP/1.0 closes each connection after one reply, so no idle keep-alive thread outlives stop().
    protocol_version = "HTTP/1.0"
    # A client that connects but never sends a request must not keep stop() waiting forever.
    timeout = 5

    def do_POST(self) -> None:
        """Handle an RPC call sent as POST (what the SDK does)."""
        self._handle()

    def do_GET(self) -> None:
        """Handle an RPC call sent as GET (older SDKs and curl)."""
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Route access logs to logging instead of stderr."""
        logger.debug("fake dysms: " + format, *args)

    def _params(self) -> dict[str, str]:
        """Merge RPC parameters from the query string and a form body, as Alibaba's gateway does."""
        params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        content_type = self.headers.get("Content-Type") or ""
        if body and content_type.startswith("application/x-www-form-urlencoded"):
            params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        return params

    def _access_key_id(self, params: dict[str, str]) -> str | None:
        """Find the caller's AccessKeyId in the V3 Authorization header, STS header or V2 parameters."""
        match = _CREDENTIAL_RE.search(self.headers.get("Authorization") or "")
        if match:
            return match.group(1)
        return self.headers.get("x-acs-accesskey-id") or params.get("AccessKeyId")

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        """Write a JSON response like Dysmsapi's."""
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("fake dysms: client went away before the reply")

    def _handle(self) -> None:
        """Record a SendSms call and answer it according to the scripted mode for its number."""
        fake = self.server.fake
        params = self._params()
        request_id = str(uuid.uuid4()).upper()
        action = self.headers.get("x-acs-action") or params.get("Action")
        if action != "SendSms":
            self._reply(
                404,
                {
                    "RequestId": request_id,
                    "Code": "InvalidAction.NotFound",
                    "Message": "Specified api is not found",
                },
            )
            return
        for required in ("PhoneNumbers", "SignName", "TemplateCode"):
            if not params.get(required):
                self._reply(
                    400,
                    {
                        "RequestId": request_id,
                        "Code": f"Missing{required}",
                        "Message": f"{required} is mandatory for this action.",
                    },
                )
                return
        try:
            template_param = json.loads(params.get("TemplateParam") or "{}")
        except ValueError:
            self._reply(200, {"RequestId": request_id, "Code": "isv.INVALID_JSON_PARAM", "Message": "JSON参数不合法"})
            return
        message = {
            "phone_numbers": params["PhoneNumbers"],
            "sign_name": params["SignName"],
            "template_code": params["TemplateCode"],
            "template_param": template_param,
            "access_key_id": self._access_key_id(params),
        }
        mode, kw = fake._received(message)

        if mode == "hang":
            # Wait on the stop event so stop() never blocks behind a hung request.
            if fake._stopping.wait(float(kw.get("seconds", 10))):
                return
            mode = "ok"
        if mode == "http_500":
            status, payload = (
                500,
                {
                    "RequestId": request_id,
                    "HostId": "dysmsapi.aliyuncs.com",
                    "Code": kw.get("code", "InternalError"),
                    "Message": "The request processing has failed due to some unknown error.",
                },
            )
        elif mode == "business_error":
            code = kw.get("code", "isv.BUSINESS_LIMIT_CONTROL")
            message_text = kw.get("message", _BUSINESS_MESSAGES.get(code, "业务错误"))
            status, payload = 200, {"RequestId": request_id, "Code": code, "Message": message_text}
        else:
            biz_id = f"{next(fake._biz_ids)}^0"
            status, payload = 200, {"RequestId": request_id, "BizId": biz_id, "Code": "OK", "Message": "OK"}
        fake._answered(message, payload)
        self._reply(status, payload)


class _Counter:
    """Thread-safe increasing integers for BizId values."""

    def __init__(self, start: int) -> None:
        """Start counting at start."""
        self._next = start
        self._lock = threading.Lock()

    def __next__(self) -> int:
        """Return the next value."""
        with self._lock:
            value = self._next
            self._next += 1
            return value


class FakeDysms:
    """An in-process Dysmsapi SendSms server on 127.0.0.1 that records messages and fails on request."""

    def __init__(self, port: int = 0) -> None:
        """Prepare an unstarted server; port 0 picks a free port at start()."""
        self._port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._scripts: dict[str, tuple[str, dict[str, Any]]] = {}
        self._delivered_codes: dict[str, str | None] = {}
        self._biz_ids = _Counter(123456789)
        self.sent: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []

    def start(self) -> FakeDysms:
        """Bind 127.0.0.1 and serve in a daemon thread; returns self for chaining."""
        if self._server is not None:
            raise RuntimeError("FakeDysms already started")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-dysms", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Wake any hung requests, stop serving, close the socket and join every thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeDysms:
        """Start the server for a with-block."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server at the end of a with-block."""
        self.stop()

    @property
    def endpoint(self) -> str:
        """The base URL to hand to DysmsProvider, e.g. "http://127.0.0.1:41234"."""
        if self._server is None:
            raise RuntimeError("FakeDysms is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, phone_numbers: str, mode: str, **kw: Any) -> None:
        """Make later SendSms calls to phone_numbers behave as mode: ok, business_error, http_500 or hang."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        with self._lock:
            self._scripts[phone_numbers] = (mode, dict(kw))

    def last_code(self, phone_numbers: str) -> str | None:
        """The "code" of the newest message answered OK for this PhoneNumbers value, or None."""
        with self._lock:
            return self._delivered_codes.get(phone_numbers)

    def received_code(self, phone_numbers: str) -> str | None:
        """The "code" of the newest SendSms received for this PhoneNumbers value, however it was answered."""
        with self._lock:
            for message in reversed(self.sent):
                param = message["template_param"]
                if message["phone_numbers"] == phone_numbers and isinstance(param, dict) and "code" in param:
                    return str(param["code"])
        return None

    def reset(self) -> None:
        """Forget recorded messages and scripts (keeps the server running)."""
        with self._lock:
            self.sent.clear()
            self.replies.clear()
            self._scripts.clear()
            self._delivered_codes.clear()

    def _received(self, message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Record an incoming SendSms and return the scripted (mode, kwargs) for its number."""
        with self._lock:
            self.sent.append(message)
            return self._scripts.get(message["phone_numbers"], ("ok", {}))

    def _answered(self, message: dict[str, Any], payload: dict[str, Any]) -> None:
        """Record the reply body and, for accepted messages, the code that last_code() reports."""
        param = message["template_param"]
        code = param.get("code") if isinstance(param, dict) else None
        with self._lock:
            self.replies.append(payload)
            if payload["Code"] == "OK":
                self._delivered_codes[message["phone_numbers"]] = None if code is None else str(code)


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
    fake = FakeDysms(port=args.port).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(fake.endpoint, flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
