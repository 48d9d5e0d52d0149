"""What a request brings, as handlers need it: the JSON body, the caller's IP, FC's credentials, the socket."""

from __future__ import annotations

import ipaddress
import json
import random
import re
from functools import cached_property
from typing import Any

from flask import current_app, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from .config import Settings
from .errors import ApiError
from .fc import Credentials

SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")
REQUEST_ID_MAX = 64


class ApiRequest:
    """What a handler needs from the HTTP request: the JSON body, query, caller and user."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uid: str | None = g.get("uid")
        self.claims: dict[str, Any] = g.get("claims") or {}

    @cached_property
    def client_ip(self) -> str:
        """The caller's IP (worked out only by the handlers that need it)."""
        return client_ip(self.settings)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object, or 400 InvalidInput if it is not one (413 if it is over the cap)."""
        raw = read_body()
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is None and len(raw) >= limit:
            # A chunked body is cut at the cap rather than refused: reaching it means it was larger.
            raise RequestEntityTooLarge()
        try:
            text = raw.decode("utf-8")
            body = json.loads(text) if text else None
            # A "\ud800" escape decodes to a lone surrogate no database (or log) can encode. Only such an
            # escape can produce one (raw UTF-8 cannot), so the full check runs only when one is present.
            if SURROGATE_ESCAPE.search(text):
                json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (UnicodeError, ValueError, RecursionError) as exc:
            raise ApiError("InvalidInput", "请求体不是合法的 JSON") from exc
        if not isinstance(body, dict):
            raise ApiError("InvalidInput", "请求体必须是 JSON 对象")
        return body

    def fc_credentials(self) -> Credentials | None:
        """The function role's temporary credentials FC sends with each request (fresher than the env's)."""
        key_id = request.headers.get("x-fc-access-key-id")
        secret = request.headers.get("x-fc-access-key-secret")
        if not (key_id and secret):
            return None
        return Credentials(key_id, secret, request.headers.get("x-fc-security-token") or None)

    @property
    def client_socket(self) -> Any:
        """The client's socket under gunicorn (to notice a hang-up during a stream), else None."""
        return request.environ.get("gunicorn.socket")

    @property
    def args(self) -> Any:
        """The query string parameters."""
        return request.args

    def user_uid(self) -> str:
        """The authenticated user's uid (only on bearer_jwt routes)."""
        assert self.uid is not None, "user_uid() on a route without auth"
        return self.uid


def read_body() -> bytes:
    """The whole request body: 413 over the cap, 400 when it is malformed or shorter than announced."""
    try:
        raw = request.get_data(cache=True)  # with a Content-Length over the cap this raises 413
    except RequestEntityTooLarge:
        raise
    except Exception as exc:
        if is_client_framing_error(exc):  # a malformed chunked body, read only now (gunicorn parses lazily)
            raise ApiError("InvalidInput", "请求体的分块编码不正确") from exc
        raise
    if request.content_length is not None and len(raw) < request.content_length:
        # The client half-closed before sending all it announced: act on none of it.
        raise ApiError("InvalidInput", "请求体不完整")
    return raw


def is_client_framing_error(exc: BaseException) -> bool:
    """Whether an exception is gunicorn's verdict on a malformed request body (the client's mistake)."""
    return type(exc).__module__.startswith("gunicorn.http") or isinstance(exc, ClientDisconnected)


def client_ip(settings: Settings) -> str:
    """The caller's IP.

    Behind FC (AICHAT_TRUST_PROXY): FC's gateway ignores client-sent `x-fc-*` headers, so its
    `x-fc-client-ip`, when present, is taken as is; otherwise the X-Forwarded-For entry the trusted
    proxies appended, counted from the right (the leftmost entries are whatever the client sent).
    Else the socket peer.
    """
    if settings.trust_proxy:
        for candidate in (
            request.headers.get("x-fc-client-ip", ""),
            _forwarded_for(request.headers.get("X-Forwarded-For", ""), settings.trusted_proxy_hops),
        ):
            try:
                return str(ipaddress.ip_address(candidate.strip()))
            except ValueError:
                continue
    return request.remote_addr or "0.0.0.0"


def _forwarded_for(header: str, hops: int) -> str:
    entries = [entry.strip() for entry in header.split(",") if entry.strip()]
    return entries[-hops] if len(entries) >= hops else ""


def request_id_of(header: str | None) -> str:
    """FC's request id when it is a sane token (it is echoed and logged: capped, no control characters)."""
    if header and len(header) <= REQUEST_ID_MAX and REQUEST_ID.fullmatch(header):
        return header
    # A correlation id, not a secret: 128 random bits without uuid4's getrandom() syscall per request (one
    # syscall gives up the GIL; `random` is reseeded in each forked worker).
    return f"{random.getrandbits(128):032x}"
