"""SMS providers that deliver login codes: a console stub for local runs and Alibaba Cloud Dysmsapi."""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from ..fc import Credentials

logger = logging.getLogger("aichat.sms")

# Dysmsapi codes that mean "this number is malformed" (as opposed to quota, template or account problems).
_BAD_NUMBER_CODES = frozenset({"isv.MOBILE_NUMBER_ILLEGAL"})

_DOMESTIC_COUNTRY_CODE = "86"


@dataclass(frozen=True)
class SmsReceipt:
    """Proof that the provider accepted a message: its request id and delivery (biz) id."""

    request_id: str
    biz_id: str


class SmsError(Exception):
    """Base class for every failure to hand a message to the SMS provider."""

    def __init__(self, message: str = "", *, provider_code: str | None = None) -> None:
        """Keep the provider's error code (if any) next to a human-readable message."""
        super().__init__(message)
        self.provider_code = provider_code


class SmsRejected(SmsError):
    """The provider answered but refused the message (response code other than "OK")."""

    def __init__(self, message: str = "", *, provider_code: str | None = None, bad_number: bool | None = None) -> None:
        """Record the provider code and whether it means the phone number itself is invalid."""
        super().__init__(message, provider_code=provider_code)
        self.bad_number = provider_code in _BAD_NUMBER_CODES if bad_number is None else bad_number


class SmsUnavailable(SmsError):
    """The provider could not be reached or failed (network, timeout, HTTP error, SDK error)."""


class ConsoleSmsProvider:
    """Local runs: logs the code instead of sending it."""

    def send(
        self, *, phone_number: str, country_code: str, code: str, credentials: Credentials | None = None
    ) -> SmsReceipt:
        """Log the code for the developer and return a synthetic receipt."""
        logger.info("SMS code for %s: %s", phone_number, code)
        return SmsReceipt(request_id="CONSOLE-" + uuid.uuid4().hex, biz_id="CONSOLE")


def _mask(number: str) -> str:
    """Hide all but the last four digits of a phone number for logs."""
    return "***" + number[-4:]


def _parse_endpoint(endpoint: str) -> tuple[str, str]:
    """Split an endpoint setting (bare host or http(s) URL) into the SDK's protocol and host[:port]."""
    raw = endpoint.strip()
    if not raw:
        raise ValueError("SMS endpoint must not be empty")
    parts = urlsplit(raw if "://" in raw else "https://" + raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"SMS endpoint must be a host or an http(s) URL, got {endpoint!r}")
    # The SDK always posts to "/" and would silently drop a path, query or credentials.
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"SMS endpoint must not contain a path, query or user info, got {endpoint!r}")
    _ = parts.port  # urlsplit checks the port lazily; fail here rather than on the first send
    return parts.scheme, parts.netloc


def _dysms_phone_number(country_code: str, phone_number: str) -> str:
    """Format a number the way Dysmsapi wants it: bare for mainland China, else country code + number."""
    country = country_code.strip().lstrip("+")
    number = phone_number.strip()
    return number if country == _DOMESTIC_COUNTRY_CODE else country + number


# SendSms puts PhoneNumbers and TemplateParam (the code) in the query string of the request URL.
_SEND_SMS_QUERY_RE = re.compile(r"\?[^\s\"']*TemplateParam=[^\s\"']*")


class _RedactSendSmsQuery(logging.Filter):
    """Strips SendSms query strings from HTTP-library debug lines so numbers and codes never reach logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place when its message carries a SendSms query string."""
        message = record.getMessage()
        if "TemplateParam=" in message:
            record.msg = _SEND_SMS_QUERY_RE.sub("?<redacted>", message)
            record.args = ()
        return True


@functools.cache
def _sdk() -> SimpleNamespace:
    """Import the Alibaba Cloud SDK on first use, since importing it costs ~0.5 s of FC cold start."""
    import urllib3.exceptions
    from alibabacloud_dysmsapi20170525.client import Client
    from alibabacloud_dysmsapi20170525.models import SendSmsRequest
    from alibabacloud_tea_openapi.models import Config
    from darabonba.exceptions import RetryError
    from darabonba.runtime import RuntimeOptions
    from Tea.exceptions import TeaException

    # darabonba-core forces its logger to DEBUG and, when DEBUG=sdk is set, logs full request URLs; urllib3
    # logs them too whenever DEBUG logging is on. Filters only run for emitted records, so INFO pays nothing.
    logging.getLogger("darabonba-core").setLevel(logging.INFO)
    for name in ("darabonba-core", "urllib3.connectionpool"):
        http_logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactSendSmsQuery) for f in http_logger.filters):
            http_logger.addFilter(_RedactSendSmsQuery())
    return SimpleNamespace(
        Client=Client,
        Config=Config,
        SendSmsRequest=SendSmsRequest,
        RuntimeOptions=RuntimeOptions,
        # TeaException covers the SDK's ClientException/ServerException/ThrottlingException (HTTP 4xx/5xx)
        # and UnretryableException (network errors and timeouts wrapped by the SDK); the rest are
        # transport errors in case one ever escapes the SDK's own wrapping.
        errors=(
            TeaException,
            RetryError,
            OSError,
            urllib3.exceptions.HTTPError,
            json.JSONDecodeError,
        ),
    )


_SDK_MODULE_PREFIXES = ("Tea.", "darabonba.", "alibabacloud_")


def _transport_error(exc: BaseException) -> BaseException:
    """Unwrap the SDK's exception wrappers to the first non-SDK error (e.g. requests' ReadTimeout)."""
    seen: set[int] = set()
    while type(exc).__module__.startswith(_SDK_MODULE_PREFIXES) and id(exc) not in seen:
        seen.add(id(exc))
        # UnretryableException keeps it in inner_exception; RetryError is raised inside an except block.
        inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


class DysmsProvider:
    """Sends login codes through Alibaba Cloud Dysmsapi SendSms."""

    def __init__(
        self,
        *,
        access_key_id: str,
        access_key_secret: str,
        security_token: str | None,
        endpoint: str,
        sign_name: str,
        template_code: str,
        connect_timeout_ms: int = 3000,
        read_timeout_ms: int = 5000,
    ) -> None:
        """Validate settings now; the SDK client itself is built lazily on the first send."""
        if not access_key_id or not access_key_secret:
            raise ValueError("Dysmsapi access key id and secret are required")
        if not sign_name or not template_code:
            raise ValueError("Dysmsapi sign name and template code are required")
        # The SDK treats 0 as "unset" and falls back to its 5 s / 10 s defaults.
        if connect_timeout_ms <= 0 or read_timeout_ms <= 0:
            raise ValueError("Dysmsapi timeouts must be positive")
        self._protocol, self._host = _parse_endpoint(endpoint)
        self._access_key_id = access_key_id
        self._access_key_secret = access_key_secret
        self._security_token = security_token or None
        self._sign_name = sign_name
        self._template_code = template_code
        self._connect_timeout_ms = int(connect_timeout_ms)
        self._read_timeout_ms = int(read_timeout_ms)
        self._client: Any = None
        self._client_key: tuple[str, str, str | None] | None = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        """Describe the provider without exposing credentials."""
        return f"DysmsProvider(endpoint={self._protocol}://{self._host}, sign_name={self._sign_name!r})"

    def _client_for(self, credentials: Credentials | None) -> Any:
        """The SDK client for the request's fresh FC credentials, or the one built from settings.

        Checked and built under one lock, and returned from a local: a thread never sees a client that
        another thread's credential rotation is replacing (it once could get None).
        """
        key = (self._access_key_id, self._access_key_secret, self._security_token)
        if credentials is not None:
            # FC's role credentials rotate; a long-lived instance follows the ones each request carries.
            key = (credentials.access_key_id, credentials.access_key_secret, credentials.security_token or None)
        with self._client_lock:
            client = self._client
            if client is None or self._client_key != key:
                client = self._build_client(*key)
                self._client, self._client_key = client, key
            return client

    def _build_client(self, access_key_id: str, access_key_secret: str, security_token: str | None) -> Any:
        # One client per credential set is safe under gthread: do_request keeps per-call state in locals,
        # static AK/STS credentials are immutable, and the HTTP session is a process-wide pool in DaraCore.
        sdk = _sdk()
        config = sdk.Config(
            access_key_id=access_key_id,
            access_key_secret=access_key_secret,
            security_token=security_token,
            endpoint=self._host,
            protocol=self._protocol,
            connect_timeout=self._connect_timeout_ms,
            read_timeout=self._read_timeout_ms,
        )
        return sdk.Client(config)

    def send(
        self, *, phone_number: str, country_code: str, code: str, credentials: Credentials | None = None
    ) -> SmsReceipt:
        """Send the code via SendSms, raising SmsRejected or SmsUnavailable on failure."""
        masked = _mask(phone_number)
        client = self._client_for(credentials)
        sdk = _sdk()
        request = sdk.SendSmsRequest(
            phone_numbers=_dysms_phone_number(country_code, phone_number),
            sign_name=self._sign_name,
            template_code=self._template_code,
            template_param=json.dumps({"code": code}),
        )
        # No retry_options on the Config means exactly one attempt, so these two timeouts bound the call.
        runtime = sdk.RuntimeOptions(
            connect_timeout=self._connect_timeout_ms,
            read_timeout=self._read_timeout_ms,
            autoretry=False,
        )
        try:
            response = client.send_sms_with_options(request, runtime)
        except sdk.errors as exc:
            status = getattr(exc, "status_code", None)
            # The SDK formats a missing error code as the string "None".
            provider_code = getattr(exc, "code", None) if status is not None else None
            provider_code = provider_code if provider_code not in (None, "", "None") else None
            reason = f"HTTP {status}" if status is not None else type(_transport_error(exc)).__name__
            logger.warning("Dysmsapi unavailable for %s: %s (code=%s)", masked, reason, provider_code or "-")
            # Drop the chain: SDK/requests messages embed the request URL, i.e. the number and the code.
            raise SmsUnavailable(f"Dysmsapi unavailable: {reason}", provider_code=provider_code) from None

        body = getattr(response, "body", None)
        result_code = getattr(body, "code", None)
        if not result_code:
            logger.warning("Dysmsapi returned no result code for %s", masked)
            raise SmsUnavailable("Dysmsapi returned a response without a result code")
        if result_code != "OK":
            logger.warning("Dysmsapi rejected SMS to %s: code=%s", masked, result_code)
            raise SmsRejected(f"Dysmsapi rejected the message: {result_code}", provider_code=result_code)
        logger.info("Dysmsapi accepted SMS to %s: request_id=%s biz_id=%s", masked, body.request_id, body.biz_id)
        return SmsReceipt(request_id=body.request_id or "", biz_id=body.biz_id or "")


def build_sms_provider(settings: Any) -> ConsoleSmsProvider | DysmsProvider:
    """The provider the settings name: Dysmsapi with FC's injected credentials, or the local console."""
    if settings.sms_provider == "console":
        return ConsoleSmsProvider()
    return DysmsProvider(
        access_key_id=settings.alibaba_access_key_id,
        access_key_secret=settings.alibaba_access_key_secret,
        security_token=settings.alibaba_security_token or None,
        endpoint=settings.sms_endpoint,
        sign_name=settings.sms_sign_name,
        template_code=settings.sms_template_code,
        connect_timeout_ms=settings.sms_connect_timeout_ms,
        read_timeout_ms=settings.sms_read_timeout_ms,
    )
