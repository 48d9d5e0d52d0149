"""A minimal OSS client over its REST API with V4 signatures (PUT, DELETE, presigned GET).

Only what the voice cache needs, so the OSS SDK (and its cryptography dependencies) stays out of the
layer. Credentials are the function role's temporary ones (with their security token); requests go to
the in-region internal endpoint on FC.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from ..errors import ApiError
from ..fc import Credentials

if TYPE_CHECKING:
    import requests

ALGORITHM = "OSS4-HMAC-SHA256"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signature(secret: str, *, day: str, region: str, string_to_sign: str) -> str:
    """V4: a signing key derived from the secret, the day, the region and the service, over the text."""
    key = _hmac(_hmac(_hmac(_hmac(("aliyun_v4" + secret).encode(), day), region), "oss"), "aliyun_v4_request")
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def canonical_request(method: str, uri: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """Method, URI, the sorted (already encoded) query, the signed headers (x-oss-*, content-type,
    content-md5), no additional headers, and the unsigned payload marker."""
    canonical_query = "&".join(f"{k}={v}" if v else k for k, v in sorted(query.items()))
    signed = sorted(
        (k.lower(), v.strip())
        for k, v in headers.items()
        if k.lower().startswith("x-oss-") or k.lower() in ("content-type", "content-md5")
    )
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in signed)
    return f"{method}\n{quote(uri, safe='/')}\n{canonical_query}\n{canonical_headers}\n\nUNSIGNED-PAYLOAD"


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"


class OssClient:
    """One bucket through one endpoint (e.g. https://oss-cn-hangzhou-internal.aliyuncs.com)."""

    def __init__(self, *, endpoint: str, bucket: str, region: str, timeout_s: float = 10.0) -> None:
        parts = urlsplit(endpoint)
        self.scheme = parts.scheme or "https"
        # OSS addresses a bucket by its host name; an IP endpoint (a loopback fake) takes it in the path.
        self.path_style = _is_ip(parts.hostname or "")
        self.base = (
            f"{self.scheme}://{parts.netloc}/{bucket}"
            if self.path_style
            else f"{self.scheme}://{bucket}.{parts.netloc}"
        )
        self.bucket = bucket
        self.region = region
        self.timeout = (min(5.0, timeout_s), timeout_s)
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    def _client(self) -> requests.Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    import requests

                    self._session = requests.Session()
        return self._session

    def _now(self) -> tuple[str, str]:
        now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return now, now[:8]

    def _signed_headers(self, method: str, key: str, creds: Credentials, headers: dict[str, str]) -> dict[str, str]:
        timestamp, day = self._now()
        headers = {**headers, "x-oss-date": timestamp, "x-oss-content-sha256": "UNSIGNED-PAYLOAD"}
        if creds.security_token:
            headers["x-oss-security-token"] = creds.security_token
        scope = f"{day}/{self.region}/oss/aliyun_v4_request"
        canonical = canonical_request(method, f"/{self.bucket}/{key}", {}, headers)
        sig = signature(
            creds.access_key_secret,
            day=day,
            region=self.region,
            string_to_sign=string_to_sign(timestamp, scope, canonical),
        )
        headers["Authorization"] = f"{ALGORITHM} Credential={creds.access_key_id}/{scope},Signature={sig}"
        return headers

    def _send(self, method: str, key: str, creds: Credentials, *, data: bytes = b"", content_type: str = "") -> None:
        import requests

        headers = {"Content-Type": content_type} if content_type else {}
        headers = self._signed_headers(method, key, creds, headers)
        url = f"{self.base}/{quote(key, safe='/')}"
        try:
            resp = self._client().request(method, url, data=data, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ApiError("NetworkError", "音频存储连接失败") from exc
        if resp.status_code not in (200, 204):
            raise ApiError("UpstreamHTTPError", f"音频存储返回 HTTP {resp.status_code}")

    def put(self, key: str, data: bytes, content_type: str, creds: Credentials) -> None:
        """PutObject."""
        self._send("PUT", key, creds, data=data, content_type=content_type)

    def delete(self, key: str, creds: Credentials) -> None:
        """DeleteObject (a missing object is fine)."""
        self._send("DELETE", key, creds)

    def presign_get(self, key: str, creds: Credentials, *, expires_s: int) -> str:
        """A GET URL signed for `expires_s` seconds (it also dies with the credentials' token)."""
        timestamp, day = self._now()
        scope = f"{day}/{self.region}/oss/aliyun_v4_request"
        query = {
            "x-oss-signature-version": ALGORITHM,
            "x-oss-credential": quote(f"{creds.access_key_id}/{scope}", safe=""),
            "x-oss-date": timestamp,
            "x-oss-expires": str(expires_s),
        }
        if creds.security_token:
            query["x-oss-security-token"] = quote(creds.security_token, safe="")
        canonical = canonical_request("GET", f"/{self.bucket}/{key}", query, {})
        sig = signature(
            creds.access_key_secret,
            day=day,
            region=self.region,
            string_to_sign=string_to_sign(timestamp, scope, canonical),
        )
        encoded = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{self.base}/{quote(key, safe='/')}?{encoded}&x-oss-signature={sig}"


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
