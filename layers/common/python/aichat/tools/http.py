"""A small JSON-over-HTTP client for tool providers: explicit timeouts, a size cap, one pooled session."""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from .base import ToolError

if TYPE_CHECKING:
    import requests

log = logging.getLogger("aichat.tools")

# A provider answer larger than this is not a weather report or a hot list.
MAX_BODY_BYTES = 2 * 1024 * 1024
# Some boards answer browsers only.
USER_AGENT = "Mozilla/5.0 (Linux; Android 13) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124 Mobile Safari/537.36"


class JsonClient:
    """GETs JSON from one provider; every failure (network, status, size, not JSON) is a ToolError."""

    def __init__(self, base_url: str, *, provider: str, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider
        self.timeout = (connect_timeout_s, read_timeout_s)
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    def _client(self) -> requests.Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    import requests  # loaded on the first tool call, not at cold start

                    session = requests.Session()
                    session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
                    self._session = session
        return self._session

    def get(self, path: str, *, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON body of GET base_url+path; raises ToolError unless it is a 200 with JSON."""
        import requests

        url = self.base_url + path
        try:
            with self._client().get(url, params=params, headers=headers, timeout=self.timeout, stream=True) as resp:
                if resp.status_code != 200:
                    extra = {"provider": self.provider, "status": resp.status_code}
                    log.warning("tool provider answered an error", extra=extra)
                    raise ToolError(f"{self.provider} 返回 HTTP {resp.status_code}")
                body = resp.raw.read(MAX_BODY_BYTES + 1, decode_content=True)
        except ToolError:
            raise
        except requests.Timeout as exc:
            raise ToolError(f"{self.provider} 响应超时") from exc
        except Exception as exc:  # requests / urllib3 errors while connecting or reading the body
            if "timed out" in str(exc).lower():
                raise ToolError(f"{self.provider} 响应超时") from exc
            raise ToolError(f"{self.provider} 无法连接") from exc
        if len(body) > MAX_BODY_BYTES:
            raise ToolError(f"{self.provider} 返回的数据过大")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ToolError(f"{self.provider} 返回的不是 JSON") from exc
