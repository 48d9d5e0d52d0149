"""LoginService's operations: send a code, log in with it, the profile, logout, account deletion."""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..fc import Credentials
from ..store import Database, Tx, now_ms
from ..tokens import revoke, revoked
from . import codes, profile, sessions, users
from .code_limits import CodeLimits
from .phone import Phone, is_test_account, mask_phone, parse_phone, string_field
from .sessions_api import Sessions
from .sms import SmsError, SmsRejected

log = logging.getLogger("aichat.accounts")

VERIFY_CODE = re.compile(r"[0-9]{4,8}")
CODE_DIGITS = 6

# eraser(tx, uid=...) -> messages erased: another feature's delete_for_user, run in the deletion's transaction.
Eraser = Callable[..., Any]


class Accounts:
    """Verification codes, users and tokens, backed by the database and an SMS provider."""

    def __init__(
        self, settings: Settings, db: Database, sms: Any, *, erasers: Sequence[Eraser] = (), redis: Any = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.sms = sms
        # The SMS limits in Redis when it is configured (else, and while it is away, in the database).
        self.code_limits = CodeLimits(settings, redis) if redis is not None else None
        # Account deletion also erases what other features stored; they are handed in, not imported.
        self.erasers = tuple(erasers)
        self.sessions = Sessions(settings, db, redis)

    def _phone(self, body: dict[str, Any]) -> Phone:
        return parse_phone(body, self.settings.test_account)

    def _is_test(self, phone: Phone) -> bool:
        return is_test_account(phone, self.settings.test_account)

    # -- send_code ---------------------------------------------------------------------------------
    def send_code(
        self, body: dict[str, Any], *, client_ip: str, credentials: Credentials | None = None
    ) -> dict[str, Any]:
        """Issue and send a verification code, answering the contract's send_code body."""
        phone = self._phone(body)
        value = body.get("source_ip")
        # The client-reported IP: recorded for support, never trusted for limits.
        source_ip = value[:64] if isinstance(value, str) and value else None
        if self._is_test(phone):
            return {
                "success": True,
                "message": f"测试账号验证码固定为 {self.settings.test_account.verify_code}",  # type: ignore[union-attr]
                "request_id": "TEST-LOGIN",
                "biz_id": "TEST-LOGIN",
                "is_test_account": True,
            }
        code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
        # With Redis the limits are claimed there first (None: Redis unavailable, the database checks them).
        limits = self.code_limits
        claim = limits.claim(phone=phone, client_ip=client_ip, now=now_ms()) if limits is not None else None
        try:
            with self.db.tx() as tx:
                code_id = codes.reserve(
                    tx,
                    settings=self.settings,
                    phone=phone,
                    code=code,
                    client_ip=client_ip,
                    source_ip=source_ip,
                    checked=claim is not None,
                )
        except BaseException:
            if claim is not None and limits is not None:  # no code was stored: the send is not spent
                limits.give_back(phone=phone, member=claim)
            raise
        try:
            receipt = self.sms.send(
                phone_number=phone.phone_number, country_code=phone.country_code, code=code, credentials=credentials
            )
        except SmsError as exc:
            self._send_failed(phone, code_id, claim or "")
            if isinstance(exc, SmsRejected):
                if getattr(exc, "bad_number", False):
                    raise ApiError("InvalidPhoneNumber") from exc
                raise ApiError("SendCodeFailed", status=400) from exc
            raise ApiError("SendCodeFailed", status=500) from exc
        except Exception:
            self._send_failed(phone, code_id, claim or "")
            raise
        with self.db.tx() as tx:
            codes.activate(tx, phone=phone, code_id=code_id, provider_request_id=receipt.request_id)
        log.info("verification code sent", extra={"phone": phone.masked, "client_ip": client_ip})
        return {"success": True, "message": "验证码已发送", "request_id": receipt.request_id, "biz_id": receipt.biz_id}

    def _send_failed(self, phone: Phone, code_id: int, claim: str) -> None:
        with self.db.tx() as tx:
            codes.send_failed(tx, phone=phone, code_id=code_id)
        if claim and self.code_limits is not None:
            self.code_limits.give_back(phone=phone, member=claim)

    # -- login -------------------------------------------------------------------------------------
    def login(self, body: dict[str, Any], *, client_ip: str = "", user_agent: str = "") -> dict[str, Any]:
        """Check a verification code and answer the contract's login body with a fresh JWT (of a new session,
        with its refresh token: additive fields)."""
        phone = self._phone(body)
        code = string_field(body, "verify_code") or ""
        if not VERIFY_CODE.fullmatch(code):
            raise ApiError("InvalidVerifyCode")
        is_test = self._is_test(phone)
        if is_test:
            expected = self.settings.test_account.verify_code  # type: ignore[union-attr]
            if not hmac.compare_digest(code.encode(), expected.encode()):
                raise ApiError("VerifyFailed")
            with self.db.tx() as tx:
                uid = users.user_for(tx, phone=phone)
                issued = self.sessions.start(tx, uid=uid, client_ip=client_ip, user_agent=user_agent)
        else:
            uid = None
            with self.db.tx() as tx:
                if codes.consume(tx, settings=self.settings, phone=phone, code=code, limits=self.code_limits):
                    uid = users.user_for(tx, phone=phone)
                    issued = self.sessions.start(tx, uid=uid, client_ip=client_ip, user_agent=user_agent)
            if uid is None:  # raised after the block so the counted miss is committed
                raise ApiError("VerifyFailed")
        log.info("login", extra={"uid": uid, "test_account": is_test})
        return {
            "success": True,
            "message": "登录成功",
            "token_type": issued["token_type"],
            "access_token": issued["access_token"],
            "expires_in": issued["expires_in"],
            "user": {"uid": uid, "phone_number": phone.phone_number, "country_code": phone.country_code},
            "is_test_account": is_test,
            "refresh_token": issued["refresh_token"],
            "refresh_expires_in": issued["refresh_expires_in"],
        }

    # -- account (bearer token) ----------------------------------------------------------------------
    def me(self, uid: str) -> dict[str, Any]:
        """The signed-in user's profile, with the phone number masked."""
        row = self.db.read(lambda tx: users.get(tx, uid=uid))
        if row is None:
            raise ApiError("Unauthorized")
        created = datetime.fromtimestamp(row["created_at"] / 1000, self.settings.tz).strftime("%Y-%m-%dT%H:%M:%S")
        return {
            "success": True,
            "user": {
                "uid": row["uid"],
                "phone_number": mask_phone(row["phone_number"]) if row["phone_number"] else "",
                "country_code": row["country_code"] or "",
                "created_at": created,
                "username": row["username"],
                "email": profile.mask_email(row["email"]),
                "nickname": row["nickname"],
                "avatar_url": row["avatar_url"],
                "bio": row["bio"],
                "has_password": row["password_hash"] is not None,
            },
        }

    def update_profile(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /me/update: nickname, avatar_url (https), bio; a field absent stays, null clears it."""
        checks = {
            "nickname": lambda v: profile.text(v, "nickname"),
            "bio": lambda v: profile.text(v, "bio"),
            "avatar_url": profile.avatar_url,
        }
        unknown = sorted(set(body) - set(checks))
        if unknown:
            raise ApiError("InvalidInput", f"不能修改的字段：{unknown[0]}")
        values = {name: check(body[name]) for name, check in checks.items() if name in body}
        with self.db.tx() as tx:
            if users.get(tx, uid=uid, lock=True) is None:
                raise ApiError("Unauthorized")
            users.update_profile(tx, uid=uid, values=values)
        return self.me(uid)

    def logout(self, claims: dict[str, Any]) -> dict[str, Any]:
        """Revoke the presented token and its session on every instance."""
        return self.sessions.logout(claims)

    def delete_account(self, claims: dict[str, Any]) -> dict[str, Any]:
        """Erase the user and everything stored for them, and revoke the token (one transaction)."""
        uid = claims["sub"]
        with self.db.tx() as tx:
            user = users.get(tx, uid=uid, lock=True)
            if user is None:
                raise ApiError("Unauthorized")
            phone = Phone(user["country_code"], user["phone_number"]) if user["phone_number"] else None
            erased = self._erase(tx, uid=uid, phone=phone)
            revoke(tx, claims)
        revoked(self.sessions.redis, uid)
        if phone is not None and self.code_limits is not None:
            self.code_limits.forget(phone)
        log.info("account deleted", extra={"uid": uid, "messages": erased})
        return {"success": True, "message": "账号已注销", "deleted_messages": erased}

    def _erase(self, tx: Tx, *, uid: str, phone: Phone | None) -> int:
        erased = sum(int(eraser(tx, uid=uid) or 0) for eraser in self.erasers)
        if phone is not None:
            codes.delete_for_phone(tx, phone=phone)
        sessions.delete_for_user(tx, uid=uid)
        users.delete(tx, uid=uid)  # the password hash and the profile with it
        return erased
