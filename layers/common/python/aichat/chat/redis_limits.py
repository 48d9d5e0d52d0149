"""The ChatLimiter in Redis: the per-minute window and the stream slots as sorted sets, changed atomically
by one Lua script; every key expires by itself, a dead instance's slot after its lease.

When Redis is unavailable, acquire() falls back to the database limiter (so limits still hold across
instances, at the database's cost) and the slot it hands out is released where it was taken.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..fastpath import FastPath, RedisUnavailable
from ..store import Database, Tx, now_ms
from .limits import MINUTE_MS, DbChatLimiter, _seconds

log = logging.getLogger("aichat.chat.limits")

# KEYS: events, slots. ARGV: now, window_ms, per_minute, max_streams, slot_member, lease_ms.
# Returns {0, 0} taken, {1, ms until a slot frees} too many streams, {2, ms until the window frees}.
ACQUIRE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local slots = redis.call('ZCARD', KEYS[2])
if slots >= tonumber(ARGV[4]) then
  local soonest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {1, tonumber(soonest[2]) - now}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local seen = redis.call('ZCARD', KEYS[1])
if seen >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {2, tonumber(oldest[2]) + tonumber(ARGV[2]) - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {0, 0}
"""


class RedisChatLimiter:
    """Counts and slots in Redis; the database limiter when Redis is not there."""

    def __init__(self, settings: Settings, db: Database, redis: FastPath) -> None:
        self.settings = settings
        self.redis = redis
        self.fallback = DbChatLimiter(settings, db)
        self._held: dict[str, str] = {}  # slot member -> uid
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None

    def acquire(self, tx: Tx, *, uid: str) -> Any:
        # The user's row is locked as with the database limiter: one user's turns stay serialised (two
        # first messages cannot race to create a default conversation) and a deleted user is refused.
        if tx.one("SELECT uid FROM users WHERE uid = ?" + tx.for_update, (uid,)) is None:
            raise ApiError("Unauthorized")
        s = self.settings
        member = uuid.uuid4().hex
        keys = [self.redis.key("chat", "events", uid), self.redis.key("chat", "slots", uid)]
        args = [
            now_ms(),
            MINUTE_MS,
            s.chat_messages_per_minute,
            s.chat_max_concurrent_streams,
            member,
            s.stream_lease_s * 1000,
        ]
        try:
            verdict, wait_ms = self.redis.run(lambda r: self.redis.script("acquire", ACQUIRE)(keys=keys, args=args))
        except RedisUnavailable:
            return self.fallback.acquire(tx, uid=uid)
        if verdict == 1:
            raise ApiError("RateLimited", "同时进行的对话过多，请等当前回复结束", retry_after=_seconds(wait_ms))
        if verdict == 2:
            raise ApiError("RateLimited", "发送太快了，请稍后再试", retry_after=_seconds(wait_ms))
        return f"r:{uid}:{member}"

    def keep(self, slot_id: Any) -> None:
        if not isinstance(slot_id, str):
            return self.fallback.keep(slot_id)
        _, uid, member = slot_id.split(":")
        with self._lock:
            self._held[member] = uid
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="aichat-redis-slot-keeper", daemon=True)
                self._keeper.start()
        return None

    def release(self, slot_id: Any) -> None:
        if not isinstance(slot_id, str):
            return self.fallback.release(slot_id)
        _, uid, member = slot_id.split(":")
        with self._lock:
            self._held.pop(member, None)
        try:
            self.redis.run(lambda r: r.zrem(self.redis.key("chat", "slots", uid), member))
        except RedisUnavailable:
            log.warning("could not release a stream slot in redis; its lease frees it")
        return None

    def _keep(self) -> None:
        import time

        period = max(1.0, self.settings.stream_lease_s / 3)
        while True:
            time.sleep(period)
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            expiry = now_ms() + self.settings.stream_lease_s * 1000

            def renew(r: Any, held: dict[str, str] = held, expiry: int = expiry) -> None:
                pipe = r.pipeline(transaction=False)
                for member, uid in held.items():
                    key = self.redis.key("chat", "slots", uid)
                    pipe.zadd(key, {member: expiry}, xx=True)
                    pipe.pexpireat(key, expiry)
                pipe.execute()

            try:
                self.redis.run(renew)
            except RedisUnavailable:
                log.warning("could not renew stream slots in redis", extra={"slots": len(held)})
            except Exception:  # the keeper must outlive any one failure
                log.exception("redis slot keeper failed")


def delete_for_user(redis: FastPath | None, uid: str) -> None:
    """Account deletion's part in Redis (best effort: every key expires anyway)."""
    if redis is None:
        return
    with contextlib.suppress(RedisUnavailable):
        redis.run(lambda r: r.delete(redis.key("chat", "events", uid), redis.key("chat", "slots", uid)))
