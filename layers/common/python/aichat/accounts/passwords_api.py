"""Password accounts: register, log in with a password (username, email or phone), set or change it."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..store import Database, now_ms
from ..tokens import revoked
from . import passwords, profile, users
from .phone import Phone
from .sessions_api import Sessions
from .throttle import Failures

log = logging.getLogger("aichat.accounts")

PHONE_ACCOUNT = re.compile(r"\+?(\d{1,4}[- ]?)?\d{5,15}")


class PasswordAccounts:
    def __init__(self, settings: Settings, db: Database, sessions_api: Sessions, redis: Any = None) -> None:
        self.settings = settings
        self.db = db
        self.sessions = sessions_api
        self.failures = Failures(db, redis, settings.password_fail_window_s * 1000)

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /register: a new account with a username and a password (and an email, a nickname)."""
        username, username_key = profile.username(body.get("username"))
        email, email_key = profile.email(body.get("email"))
        nickname = profile.text(body.get("nickname"), "nickname")
        password = passwords.check_policy(body.get("password"), field="password", username=username)
        with self.db.tx() as tx:
            clash = users.taken(tx, username_key=username_key, email_key=email_key)
        if clash:
            raise ApiError("AccountExists", "用户名已被注册" if clash == "username" else "邮箱已被注册")
        hashed = passwords.hash_password(password)  # ~50 ms of CPU: outside any transaction
        with self.db.tx() as tx:
            uid = users.create_with_password(
                tx,
                username=username,
                username_key=username_key,
                email=email,
                email_key=email_key,
                nickname=nickname,
                password_hash=hashed,
            )
            if uid is None:  # taken a moment ago by a concurrent registration
                clash = users.taken(tx, username_key=username_key, email_key=email_key) or "username"
        if uid is None:
            raise ApiError("AccountExists", "用户名已被注册" if clash == "username" else "邮箱已被注册")
        log.info("registered", extra={"uid": uid})
        user = {"uid": uid, "username": username, "email": profile.mask_email(email), "nickname": nickname}
        return {"success": True, "message": "注册成功", "user": user}

    def _find(self, tx: Any, account: str, country_code: str) -> tuple[Any, str]:
        """The user an `account` names (username, email or phone) and the key its failures count under."""
        if "@" in account:
            key = account.casefold()  # as profile.email() keys an address
            return users.by_email(tx, email_key=key), f"email:{key}"
        digits = account.replace(" ", "").replace("-", "")
        if PHONE_ACCOUNT.fullmatch(account) and digits.lstrip("+").isdigit():
            number = digits.lstrip("+")
            if digits.startswith("+") and number.startswith(country_code):
                number = number[len(country_code) :]
            phone = Phone(country_code=country_code, phone_number=number)
            row = users.by_phone(tx, phone=phone)
            if row is not None or digits.startswith("+"):
                return row, f"phone:{country_code}:{number}"
            # Not a phone anyone signed in with: an all-digit username, then.
        key = account.strip().casefold()
        return users.by_username(tx, username_key=key), f"user:{key}"

    def login(self, body: dict[str, Any], *, client_ip: str, user_agent: str) -> dict[str, Any]:
        """POST /login/password: the contract's /login answer (plus the refresh token), or one 401 for every
        wrong account or password, taking as long either way; throttled per account and per IP."""
        account, password = body.get("account"), body.get("password")
        if not isinstance(account, str) or not account.strip():
            raise ApiError("InvalidInput", "缺少必填参数 account")
        if not isinstance(password, str) or not password:
            raise ApiError("InvalidInput", "缺少必填参数 password")
        if len(account) > 254 or len(password) > 4 * passwords.MAX_LENGTH:
            raise ApiError("InvalidCredentials")
        country_code = body.get("country_code") if isinstance(body.get("country_code"), str) else "86"
        s = self.settings
        window_ms = s.password_fail_window_s * 1000
        row, key = self.db.read(lambda tx: self._find(tx, account.strip(), country_code.lstrip("+") or "86"))
        seen = self.failures.seen(key, client_ip)
        now = now_ms()
        if (seen.get("by_account") or 0) >= s.password_fail_per_account:
            raise ApiError(
                "RateLimited",
                "密码错误次数过多，请稍后再试",
                retry_after=_seconds(int(seen["account_oldest"]) + window_ms - now),
            )
        if (seen.get("by_ip") or 0) >= s.password_fail_per_ip:
            raise ApiError(
                "RateLimited",
                "登录尝试过于频繁，请稍后再试",
                retry_after=_seconds(int(seen["ip_oldest"]) + window_ms - now),
            )
        ok, rehashed = passwords.verify(row["password_hash"] if row else None, passwords.normalise(password))
        if not ok:
            self.failures.add(key, client_ip)
            raise ApiError("InvalidCredentials")
        uid = row["uid"]
        with self.db.tx() as tx:
            if users.get(tx, uid=uid, lock=True) is None:
                raise ApiError("InvalidCredentials")  # deleted meanwhile
            if rehashed:
                users.set_password(tx, uid=uid, password_hash=rehashed)
            self.failures.clear(tx, key)
            issued = self.sessions.start(tx, uid=uid, client_ip=client_ip, user_agent=user_agent)
        log.info("login", extra={"uid": uid, "method": "password"})
        user = {"uid": uid, "phone_number": row["phone_number"] or "", "country_code": row["country_code"] or ""}
        return {"success": True, "message": "登录成功", **issued, "user": user, "is_test_account": False}

    def set_password(self, claims: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """POST /password/set: add a password (a phone account) or change one (the current one needed);
        a change ends the user's other sessions."""
        uid = claims["sub"]
        row = self.db.read(lambda tx: users.get(tx, uid=uid))
        if row is None:
            raise ApiError("Unauthorized")
        new = passwords.check_policy(body.get("new_password"), field="new_password", username=row["username"])
        changing = row["password_hash"] is not None
        if changing:
            current = body.get("current_password")
            if not isinstance(current, str) or not current:
                raise ApiError("InvalidInput", "修改密码需要提供 current_password")
            ok, _ = passwords.verify(row["password_hash"], passwords.normalise(current))
            if not ok:
                raise ApiError("InvalidCredentials", "当前密码错误")
        hashed = passwords.hash_password(new)
        with self.db.tx() as tx:
            users.set_password(tx, uid=uid, password_hash=hashed)
            ended = self.sessions.end_others(tx, claims) if changing else 0
        if changing:
            revoked(self.sessions.redis, uid)
        log.info("password set", extra={"uid": uid, "changed": changing, "ended_sessions": ended})
        return {"success": True, "message": "密码已修改" if changing else "密码已设置", "ended_sessions": ended}


def _seconds(ms: float) -> int:
    return max(1, math.ceil(ms / 1000))
