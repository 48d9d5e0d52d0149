"""Redis (Alibaba Cloud Tair / Redis in the VPC) for the hot path, optional: AICHAT_REDIS_URL.

redis-py is imported on first use (FC's initializer warms it). Every call is bounded by a short socket
timeout, and after a failure Redis is left alone for BREAKER_S seconds: callers fall back to the
database meanwhile (never a 500 for a Redis blip, never a hang), and it recovers by itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

log = logging.getLogger("aichat.redis")

BREAKER_S = 5.0


class RedisUnavailable(Exception):
    """Redis did not answer (or is being left alone after a failure): use the database."""


class FastPath:
    """One Redis connection pool and its breaker."""

    def __init__(self, url: str, *, timeout_s: float, prefix: str = "aichat:") -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.prefix = prefix
        self._client: Any = None
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._scripts: dict[str, Any] = {}

    def client(self) -> Any:
        if time.monotonic() < self._open_until:
            raise RedisUnavailable("redis is being left alone after a failure")
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import redis  # about 20 ms: loaded on first use, or by FC's initializer

                    self._client = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self.timeout_s,
                        socket_connect_timeout=self.timeout_s,
                        health_check_interval=30,
                        retry_on_timeout=False,
                        decode_responses=True,
                    )
        return self._client

    def run(self, work: Any) -> Any:
        """`work(client)`, or RedisUnavailable (and the breaker opens) on any Redis error."""
        client = self.client()
        try:
            return work(client)
        except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, ResponseError, ...
            if self._open_until < time.monotonic():
                log.warning("redis failed; the database serves for now", extra={"error": type(exc).__name__})
            self._open_until = time.monotonic() + BREAKER_S
            raise RedisUnavailable(str(exc)) from exc

    def script(self, name: str, source: str) -> Any:
        """A registered Lua script (EVALSHA, loaded again by redis-py if the server forgot it)."""
        if name not in self._scripts:
            self._scripts[name] = self.client().register_script(source)
        return self._scripts[name]

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def warm(self) -> None:
        """FC's initializer: import redis-py and open a connection (a failure only opens the breaker)."""
        with contextlib.suppress(RedisUnavailable):
            self.run(lambda r: r.ping())


def build(settings: Any) -> FastPath | None:
    """The settings' Redis, or None without AICHAT_REDIS_URL (everything then lives in the database)."""
    if not settings.redis_url:
        return None
    return FastPath(settings.redis_url, timeout_s=settings.redis_timeout_s, prefix=settings.redis_prefix)
