"""The SMS limits in Redis, when it is configured: the resend cooldown, the daily caps per phone and per
client IP, and each code's wrong-guess counter. One Lua call each, every key with a TTL.

The codes themselves stay in the database (verification_codes: the audit trail support reads). Every
method answers None when Redis is unavailable and the caller applies the database's limits instead,
which hold across instances on their own: the caps count the code rows every send stores either way, the
cooldown also looks at the phone's newest sent code, and wrong guesses are counted in both places'
sum. Redis being away costs the database's load, never a limit.
"""

from __future__ import annotations

import contextlib
import uuid

from ..config import Settings
from ..fastpath import FastPath, RedisUnavailable
from .codes import COOLING_DOWN, IP_CAP, PHONE_CAP, rate_limited
from .phone import Phone

# KEYS: cooldown, phone sends, ip sends. ARGV: now, cooldown_ms, per_phone, per_ip, member.
# Returns {0, 0} claimed, {1, ms} cooling down, {2, ms} phone cap, {3, ms} ip cap (ms until it lifts).
CLAIM = """
local now, day, cooldown = tonumber(ARGV[1]), 86400000, tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if left > 0 then return {1, left} end
local caps = {tonumber(ARGV[3]), tonumber(ARGV[4])}
for i = 2, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - day)
  if redis.call('ZCARD', KEYS[i]) >= caps[i - 1] then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    return {i, tonumber(oldest[2]) + day - now}
  end
end
if cooldown > 0 then redis.call('SET', KEYS[1], ARGV[5], 'PX', cooldown) end
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[i], day)
end
return {0, 0}
"""
# KEYS: cooldown, phone sends. ARGV: member. A send that failed: its cooldown (if still its own) and its
# place in the phone's cap are given back; the client IP's cap keeps it (as the database's does).
GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
# KEYS: the code's guesses. ARGV: ttl_ms. Returns the guesses so far, this one included.
GUESS = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
"""


class CodeLimits:
    def __init__(self, settings: Settings, redis: FastPath) -> None:
        self.settings = settings
        self.redis = redis

    def _phone_keys(self, phone: Phone) -> list[str]:
        """The phone's cooldown and its sends of the day."""
        return [self.redis.key("sms", "cooldown", phone.key), self.redis.key("sms", "phone", phone.key)]

    def _keys(self, phone: Phone, client_ip: str) -> list[str]:
        return [*self._phone_keys(phone), self.redis.key("sms", "ip", client_ip[:64])]

    def claim(self, *, phone: Phone, client_ip: str, now: int) -> str | None:
        """Take a send within the limits (its claim's member), raise 429 RateLimited past one, or None when
        Redis is unavailable."""
        s = self.settings
        member = uuid.uuid4().hex
        args = [now, s.code_resend_cooldown_s * 1000, s.code_max_per_phone_per_day, s.code_max_per_ip_per_day, member]
        keys = self._keys(phone, client_ip)
        try:
            verdict, wait_ms = self.redis.run(lambda r: self.redis.script("sms_claim", CLAIM)(keys=keys, args=args))
        except RedisUnavailable:
            return None
        if verdict:
            raise rate_limited(int(wait_ms), (COOLING_DOWN, PHONE_CAP, IP_CAP)[int(verdict) - 1])
        return member

    def give_back(self, *, phone: Phone, member: str) -> None:
        keys = self._phone_keys(phone)
        with contextlib.suppress(RedisUnavailable):
            self.redis.run(lambda r: self.redis.script("sms_give_back", GIVE_BACK)(keys=keys, args=[member]))

    def guess(self, *, phone: Phone, code_id: int, ttl_ms: int) -> int | None:
        """Count one guess at a code (before it is checked, so parallel guesses cannot exceed the limit);
        None when Redis is unavailable."""
        keys = [self.redis.key("sms", "guesses", phone.key, str(code_id))]
        try:
            return int(
                self.redis.run(lambda r: self.redis.script("sms_guess", GUESS)(keys=keys, args=[max(1, ttl_ms)]))
            )
        except RedisUnavailable:
            return None

    def forget(self, phone: Phone) -> None:
        """Account deletion: the phone's cooldown and cap (best effort: both expire anyway)."""
        keys = self._phone_keys(phone)
        with contextlib.suppress(RedisUnavailable):
            self.redis.run(lambda r: r.delete(*keys))
