"""A loopback fake of OSS (PutObject, GetObject through a presigned URL, DeleteObject); never shipped.

It checks every request's V4 signature the way OSS does — recomputed from the request with the secret of
the access key id it was given — and the STS token, the signing time (±15 min) and a presigned URL's expiry;
a request that fails answers 403 with OSS's XML error. Path-style addressing (`/bucket/key`), as OSS
accepts for an IP endpoint.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from aichat.voice.oss import ALGORITHM, canonical_request, signature, string_to_sign

ACCESS_KEY_ID = "STS.fake-access-key"
ACCESS_KEY_SECRET = "fake-access-secret"  # noqa: S105 - the fake's own test credential
SECURITY_TOKEN = "fake-security-token/with+odd=chars"  # noqa: S105 - likewise


class FakeOss:
    def __init__(self, *, bucket: str = "aichat-voice", region: str = "cn-hangzhou") -> None:
        self.bucket, self.region = bucket, region
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> FakeOss:
        fake = self

        class Handler(_Handler):
            owner = fake

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AICHAT_AUDIO_STORE": "oss",
            "AICHAT_OSS_ENDPOINT": self.endpoint,
            "AICHAT_OSS_BUCKET": self.bucket,
            "AICHAT_OSS_REGION": self.region,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": ACCESS_KEY_SECRET,
            "ALIBABA_CLOUD_SECURITY_TOKEN": SECURITY_TOKEN,
        }


def _error(code: str, message: str) -> bytes:
    return f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOss
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _key(self) -> str | None:
        path = self.path.split("?", 1)[0]
        prefix = f"/{self.owner.bucket}/"
        return unquote(path[len(prefix) :]) if path.startswith(prefix) else None

    def _check_time(self, stamp: str, *, expires: int | None = None) -> str | None:
        try:
            at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            return "bad x-oss-date"
        if expires is not None:
            return None if time.time() <= at + expires else "Request has expired"
        return None if abs(time.time() - at) <= 900 else "RequestTimeTooSkewed"

    def _verify_header(self, key: str) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith(ALGORITHM + " "):
            return "not a V4 Authorization header"
        fields = dict(part.strip().split("=", 1) for part in auth[len(ALGORITHM) + 1 :].split(","))
        ak, _, scope = fields.get("Credential", "").partition("/")
        if ak != ACCESS_KEY_ID:
            return "InvalidAccessKeyId"
        if self.headers.get("x-oss-security-token") != SECURITY_TOKEN:
            return "InvalidSecurityToken"
        if self.headers.get("x-oss-content-sha256") != "UNSIGNED-PAYLOAD":
            return "x-oss-content-sha256 missing"
        stamp = self.headers.get("x-oss-date") or ""
        problem = self._check_time(stamp)
        if problem:
            return problem
        day, region, service, kind = scope.split("/")
        if (day, region, service, kind) != (stamp[:8], self.owner.region, "oss", "aliyun_v4_request"):
            return "bad credential scope"
        headers = {k: v for k, v in self.headers.items()}
        canonical = canonical_request(self.command, f"/{self.owner.bucket}/{key}", {}, headers)
        expected = signature(
            ACCESS_KEY_SECRET, day=day, region=region, string_to_sign=string_to_sign(stamp, scope, canonical)
        )
        return None if fields.get("Signature") == expected else "SignatureDoesNotMatch"

    def _verify_query(self, key: str) -> str | None:
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        pairs = dict(part.partition("=")[::2] for part in query.split("&") if part)
        given = pairs.pop("x-oss-signature", None)
        if pairs.get("x-oss-signature-version") != ALGORITHM or not given:
            return "not a V4 presigned URL"
        ak, _, scope = unquote(pairs.get("x-oss-credential", "")).partition("/")
        if ak != ACCESS_KEY_ID:
            return "InvalidAccessKeyId"
        if unquote(pairs.get("x-oss-security-token", "")) != SECURITY_TOKEN:
            return "InvalidSecurityToken"
        stamp = pairs.get("x-oss-date", "")
        problem = self._check_time(stamp, expires=int(pairs.get("x-oss-expires", "0")))
        if problem:
            return problem
        day, region = scope.split("/")[:2]
        canonical = canonical_request("GET", f"/{self.owner.bucket}/{key}", pairs, {})
        expected = signature(
            ACCESS_KEY_SECRET, day=day, region=region, string_to_sign=string_to_sign(stamp, scope, canonical)
        )
        return None if given == expected else "SignatureDoesNotMatch"

    def _handle(self) -> None:
        key = self._key()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if key is None:
            return self._send(404, _error("NoSuchBucket", "no such bucket"))
        presigned = "x-oss-signature=" in self.path
        problem = self._verify_query(key) if presigned else self._verify_header(key)
        with self.owner._lock:
            self.owner.log.append({"method": self.command, "key": key, "presigned": presigned, "problem": problem})
        if problem:
            return self._send(403, _error("AccessDenied", problem))
        if self.command == "PUT":
            with self.owner._lock:
                self.owner.objects[key] = (body, self.headers.get("Content-Type") or "application/octet-stream")
            return self._send(200)
        if self.command == "DELETE":
            with self.owner._lock:
                self.owner.objects.pop(key, None)
            return self._send(204)
        with self.owner._lock:
            found = self.owner.objects.get(key)
        if found is None:
            return self._send(404, _error("NoSuchKey", "The specified key does not exist."))
        self._send(200, found[0], found[1])

    do_PUT = do_GET = do_DELETE = _handle
