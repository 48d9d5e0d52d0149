"""Failed password logins, counted per account and per client IP over a rolling window: in Redis when it is
configured (sorted sets, one Lua call, keys that expire), else — and while Redis is unavailable — in the
database (login_failures), so the limits hold across instances either way."""

from __future__ import annotations

import contextlib
from typing import Any

from ..fastpath import FastPath, RedisUnavailable
from ..store import Database, now_ms
from . import sessions

# KEYS: account set, ip set. ARGV: now, window_ms. Returns {by_account, account_oldest, by_ip, ip_oldest}.
SEEN = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  out[#out + 1] = redis.call('ZCARD', KEYS[i])
  out[#out + 1] = oldest[2] and tonumber(oldest[2]) or 0
end
return out
"""
# KEYS: account set, ip set. ARGV: now, window_ms, member.
ADD = """
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], tonumber(ARGV[1]), ARGV[3])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return 1
"""


class Failures:
    def __init__(self, db: Database, redis: FastPath | None, window_ms: int) -> None:
        self.db = db
        self.redis = redis
        self.window_ms = window_ms

    def _keys(self, account_key: str, client_ip: str) -> list[str]:
        assert self.redis is not None
        return [self.redis.key("pwfail", "account", account_key[:254]), self.redis.key("pwfail", "ip", client_ip[:64])]

    def seen(self, account_key: str, client_ip: str) -> dict[str, Any]:
        """{by_account, account_oldest, by_ip, ip_oldest} within the window."""
        if self.redis is not None:
            keys, args = self._keys(account_key, client_ip), [now_ms(), self.window_ms]
            try:
                a, a_old, i, i_old = self.redis.run(lambda r: self.redis.script("pw_seen", SEEN)(keys=keys, args=args))
                return {"by_account": a, "account_oldest": a_old, "by_ip": i, "ip_oldest": i_old}
            except RedisUnavailable:
                pass
        since = now_ms() - self.window_ms
        row = self.db.read(lambda tx: sessions.failures(tx, account_key=account_key, client_ip=client_ip, since=since))
        return dict(row or {})

    def add(self, account_key: str, client_ip: str) -> None:
        if self.redis is not None:
            import uuid

            keys, args = self._keys(account_key, client_ip), [now_ms(), self.window_ms, uuid.uuid4().hex]
            try:
                self.redis.run(lambda r: self.redis.script("pw_add", ADD)(keys=keys, args=args))
                return
            except RedisUnavailable:
                pass
        with self.db.tx() as tx:
            sessions.add_failure(tx, account_key=account_key, client_ip=client_ip, window_ms=self.window_ms)

    def clear(self, tx: Any, account_key: str) -> None:
        """A successful login forgets the account's failures (both places: either may hold some)."""
        sessions.clear_failures(tx, account_key=account_key)
        if self.redis is not None:
            with contextlib.suppress(RedisUnavailable):
                self.redis.run(lambda r: r.delete(self.redis.key("pwfail", "account", account_key[:254])))
