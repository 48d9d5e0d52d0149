"""LoginService's logic: phone validation, SMS codes with abuse limits, login and users."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .auth import issue_token
from .config import Settings
from .errors import ApiError
from .sms import Credentials, SmsError, SmsRejected
from .store import Database, Tx, is_duplicate_key, now_ms

log = logging.getLogger("aichat.accounts")

COUNTRY_CODE = re.compile(r"[0-9]{1,4}")
CN_MOBILE = re.compile(r"1[0-9]{10}")
INTL_NUMBER = re.compile(r"[0-9]{4,15}")
VERIFY_CODE = re.compile(r"[0-9]{4,8}")
CODE_DIGITS = 6
DAY_MS = 86_400_000

# Code row states; only the newest row of a phone can be "live".
PENDING, LIVE, USED, SUPERSEDED, BURNED, FAILED = "pending", "live", "used", "superseded", "burned", "failed"
SENT_STATES = (LIVE, USED, SUPERSEDED, BURNED)


@dataclass(frozen=True)
class Phone:
    """A validated phone number."""

    country_code: str
    phone_number: str

    @property
    def key(self) -> str:
        """The key abuse limits are counted by."""
        return f"{self.country_code}:{self.phone_number}"

    @property
    def masked(self) -> str:
        """A form safe for logs."""
        return f"+{self.country_code} ***{self.phone_number[-4:]}"


def _string_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    """A string field of the body: missing or not a string is InvalidInput (format checks come after)."""
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise ApiError("InvalidInput", f"缺少必填参数 {name}")
        return None
    if not isinstance(value, str):
        raise ApiError("InvalidInput", f"参数 {name} 必须是字符串")
    return value.strip()


class Accounts:
    """Verification codes, users and tokens, backed by the database and an SMS provider."""

    def __init__(self, settings: Settings, db: Database, sms: Any) -> None:
        self.settings = settings
        self.db = db
        self.sms = sms

    # -- validation --------------------------------------------------------------------------------
    def parse_phone(self, body: dict[str, Any]) -> Phone:
        """Validate phone_number and country_code (default 86) or raise InvalidPhoneNumber."""
        phone_number = _string_field(body, "phone_number")
        country_code = _string_field(body, "country_code", required=False) or "86"
        country_code = country_code.lstrip("+")
        if not COUNTRY_CODE.fullmatch(country_code):
            raise ApiError("InvalidPhoneNumber")
        phone = Phone(country_code, phone_number or "")
        if self.is_test_account(phone):
            return phone
        pattern = CN_MOBILE if country_code == "86" else INTL_NUMBER
        if not pattern.fullmatch(phone.phone_number):
            raise ApiError("InvalidPhoneNumber")
        return phone

    def is_test_account(self, phone: Phone) -> bool:
        """Whether this is the configured test account (never sent an SMS, exempt from limits)."""
        account = self.settings.test_account
        return account is not None and account.matches(phone.country_code, phone.phone_number)

    @staticmethod
    def source_ip(body: dict[str, Any]) -> str | None:
        """The client-reported IP: recorded for support, never trusted for limits."""
        value = body.get("source_ip")
        return value[:64] if isinstance(value, str) and value else None

    # -- send_code ---------------------------------------------------------------------------------
    def send_code(
        self, body: dict[str, Any], *, client_ip: str, credentials: Credentials | None = None
    ) -> dict[str, Any]:
        """Issue and send a verification code, answering the contract's send_code body."""
        phone = self.parse_phone(body)
        source_ip = self.source_ip(body)
        if self.is_test_account(phone):
            return {
                "success": True,
                "message": f"测试账号验证码固定为 {self.settings.test_account.verify_code}",  # type: ignore[union-attr]
                "request_id": "TEST-LOGIN",
                "biz_id": "TEST-LOGIN",
                "is_test_account": True,
            }
        code = "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))
        code_id = self._reserve(phone, code, client_ip=client_ip, source_ip=source_ip)
        try:
            receipt = self.sms.send(
                phone_number=phone.phone_number, country_code=phone.country_code, code=code, credentials=credentials
            )
        except SmsError as exc:
            self._send_failed(phone, code_id)
            if isinstance(exc, SmsRejected):
                if getattr(exc, "bad_number", False):
                    raise ApiError("InvalidPhoneNumber") from exc
                raise ApiError("SendCodeFailed", status=400) from exc
            raise ApiError("SendCodeFailed", status=500) from exc
        except Exception:
            self._send_failed(phone, code_id)
            raise
        self._activate(phone, code_id, receipt.request_id)
        log.info("verification code sent", extra={"phone": phone.masked, "client_ip": client_ip})
        return {
            "success": True,
            "message": "验证码已发送",
            "request_id": receipt.request_id,
            "biz_id": receipt.biz_id,
        }

    def _reserve(self, phone: Phone, code: str, *, client_ip: str, source_ip: str | None) -> int:
        """Check the abuse limits, claim the resend cooldown and store the (not yet usable) code."""
        s = self.settings
        now = now_ms()
        with self.db.tx() as tx:
            day_ago = now - DAY_MS
            placeholders = ",".join("?" * len(SENT_STATES))
            per_phone = tx.one(
                "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM verification_codes"
                " WHERE phone_number = ? AND country_code = ? AND created_at > ?"
                f" AND status IN ({placeholders})",
                (phone.phone_number, phone.country_code, day_ago, *SENT_STATES),
            )
            if per_phone and per_phone["n"] >= s.code_max_per_phone_per_day:
                raise _rate_limited(per_phone["oldest"] + DAY_MS - now, "该手机号今日验证码发送次数已达上限")
            per_ip = tx.one(
                "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM verification_codes"
                " WHERE client_ip = ? AND created_at > ?",
                (client_ip, day_ago),
            )
            if per_ip and per_ip["n"] >= s.code_max_per_ip_per_day:
                raise _rate_limited(per_ip["oldest"] + DAY_MS - now, "当前网络今日验证码请求次数已达上限")
            self._claim_cooldown(tx, phone, now)
            return tx.insert(
                "INSERT INTO verification_codes (country_code, phone_number, code_hash, status, attempts,"
                " client_ip, source_ip, created_at, expires_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
                (
                    phone.country_code,
                    phone.phone_number,
                    self._hash(phone, code),
                    PENDING,
                    client_ip,
                    source_ip,
                    now,
                    now + s.code_ttl_s * 1000,
                ),
            )

    def _claim_cooldown(self, tx: Tx, phone: Phone, now: int) -> None:
        """Atomically take the phone's resend slot, or answer 429 with the seconds left."""
        until = now + self.settings.code_resend_cooldown_s * 1000
        if tx.execute(
            "UPDATE send_cooldowns SET until_ms = ? WHERE phone_key = ? AND until_ms <= ?",
            (until, phone.key, now),
        ):
            return
        row = tx.one("SELECT until_ms FROM send_cooldowns WHERE phone_key = ?" + tx.for_update, (phone.key,))
        if row is None:
            try:
                tx.execute("INSERT INTO send_cooldowns (phone_key, until_ms) VALUES (?, ?)", (phone.key, until))
                return
            except Exception as exc:
                if not is_duplicate_key(exc):
                    raise
                row = {"until_ms": until}  # another instance claimed it a moment ago
        raise _rate_limited(row["until_ms"] - now, "验证码发送过于频繁，请稍后再试")

    def _send_failed(self, phone: Phone, code_id: int) -> None:
        """Make an unsent code unusable and give the phone its resend slot back."""
        with self.db.tx() as tx:
            tx.execute("UPDATE verification_codes SET status = ? WHERE id = ?", (FAILED, code_id))
            tx.execute("UPDATE send_cooldowns SET until_ms = 0 WHERE phone_key = ?", (phone.key,))

    def _activate(self, phone: Phone, code_id: int, provider_request_id: str) -> None:
        """Make a sent code the phone's only live one."""
        with self.db.tx() as tx:
            tx.execute(
                "UPDATE verification_codes SET status = ? WHERE phone_number = ? AND country_code = ?"
                " AND status = ? AND id <> ?",
                (SUPERSEDED, phone.phone_number, phone.country_code, LIVE, code_id),
            )
            tx.execute(
                "UPDATE verification_codes SET status = ?, provider_request_id = ? WHERE id = ?",
                (LIVE, provider_request_id[:128], code_id),
            )

    def _hash(self, phone: Phone, code: str) -> str:
        # Keyed and bound to the phone: a leaked table neither reveals codes nor lets one be reused elsewhere.
        message = f"{phone.key}:{code}".encode()
        return hmac.new(self.settings.code_secret, message, hashlib.sha256).hexdigest()

    # -- login -------------------------------------------------------------------------------------
    def login(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a verification code and answer the contract's login body with a fresh JWT."""
        phone = self.parse_phone(body)
        code = _string_field(body, "verify_code")
        if not VERIFY_CODE.fullmatch(code or ""):
            raise ApiError("InvalidVerifyCode")
        is_test = self.is_test_account(phone)
        if is_test:
            expected = self.settings.test_account.verify_code  # type: ignore[union-attr]
            if not hmac.compare_digest(code.encode(), expected.encode()):  # type: ignore[union-attr]
                raise ApiError("VerifyFailed")
            uid = self._user_for(phone)
        else:
            uid = self._consume_code(phone, code)  # type: ignore[arg-type]
        token = issue_token(uid, secret=self.settings.jwt_secret, ttl_s=self.settings.jwt_ttl_s)
        log.info("login", extra={"uid": uid, "test_account": is_test})
        return {
            "success": True,
            "message": "登录成功",
            "token_type": "Bearer",
            "access_token": token,
            "expires_in": self.settings.jwt_ttl_s,
            "user": {"uid": uid, "phone_number": phone.phone_number, "country_code": phone.country_code},
            "is_test_account": is_test,
        }

    def _consume_code(self, phone: Phone, code: str) -> str:
        """Check the phone's newest live code; consume it and return the user's uid, or count a miss."""
        now = now_ms()
        with self.db.tx() as tx:
            row = tx.one(
                "SELECT id, code_hash, attempts, expires_at FROM verification_codes"
                " WHERE phone_number = ? AND country_code = ? AND status = ? ORDER BY id DESC LIMIT 1" + tx.for_update,
                (phone.phone_number, phone.country_code, LIVE),
            )
            if row is None or row["expires_at"] <= now or row["attempts"] >= self.settings.code_max_attempts:
                raise ApiError("VerifyFailed")
            if not hmac.compare_digest(row["code_hash"], self._hash(phone, code)):
                attempts = row["attempts"] + 1
                status = BURNED if attempts >= self.settings.code_max_attempts else LIVE
                tx.execute(
                    "UPDATE verification_codes SET attempts = ?, status = ? WHERE id = ?",
                    (attempts, status, row["id"]),
                )
                failed = ApiError("VerifyFailed")
            else:
                # The status guard makes the code single-use even if two logins race.
                if not tx.execute(
                    "UPDATE verification_codes SET status = ? WHERE id = ? AND status = ?",
                    (USED, row["id"], LIVE),
                ):
                    raise ApiError("VerifyFailed")
                return self._user_for(phone, tx=tx)
        # Raised after the block so the counted miss is committed.
        raise failed

    def _user_for(self, phone: Phone, *, tx: Tx | None = None) -> str:
        """The uid of a phone's user, created on first login."""
        if tx is None:
            with self.db.tx() as own:
                return self._user_for(phone, tx=own)
        row = tx.one(
            "SELECT uid FROM users WHERE country_code = ? AND phone_number = ?",
            (phone.country_code, phone.phone_number),
        )
        if row:
            return row["uid"]
        uid = secrets.token_hex(12)
        try:
            tx.execute(
                "INSERT INTO users (uid, country_code, phone_number, created_at) VALUES (?, ?, ?, ?)",
                (uid, phone.country_code, phone.phone_number, now_ms()),
            )
        except Exception as exc:
            if not is_duplicate_key(exc):
                raise
            # A concurrent first login created the user; a locking read sees their committed row.
            row = tx.one(
                "SELECT uid FROM users WHERE country_code = ? AND phone_number = ?" + tx.for_update,
                (phone.country_code, phone.phone_number),
            )
            assert row is not None
            return row["uid"]
        return uid

    # -- account (bearer token) ----------------------------------------------------------------------
    def me(self, uid: str) -> dict[str, Any]:
        """The signed-in user's profile, with the phone number masked."""
        row = self.db.read(
            lambda tx: tx.one("SELECT uid, country_code, phone_number, created_at FROM users WHERE uid = ?", (uid,))
        )
        if row is None:
            raise ApiError("Unauthorized")
        masked = mask_phone(row["phone_number"])
        return {
            "success": True,
            "user": {
                "uid": row["uid"],
                "phone_number": masked,
                "country_code": row["country_code"],
                "created_at": datetime.fromtimestamp(row["created_at"] / 1000, self.settings.tz).strftime(
                    "%Y-%m-%dT%H:%M:%S"
                ),
            },
        }

    def logout(self, claims: dict[str, Any]) -> dict[str, Any]:
        """Revoke the presented token on every instance (it stays revoked until it would have expired)."""
        with self.db.tx() as tx:
            self._revoke(tx, claims)
        log.info("logout", extra={"uid": claims["sub"]})
        return {"success": True, "message": "已退出登录"}

    def delete_account(self, claims: dict[str, Any]) -> dict[str, Any]:
        """Erase the user, their messages, codes and limit counters, and revoke the token (one transaction)."""
        uid = claims["sub"]
        with self.db.tx() as tx:
            user = tx.one("SELECT country_code, phone_number FROM users WHERE uid = ?" + tx.for_update, (uid,))
            if user is None:
                raise ApiError("Unauthorized")
            erased = tx.execute("DELETE FROM messages WHERE uid = ?", (uid,))
            tx.execute("DELETE FROM chat_events WHERE uid = ?", (uid,))
            tx.execute("DELETE FROM stream_slots WHERE uid = ?", (uid,))
            tx.execute(
                "DELETE FROM verification_codes WHERE country_code = ? AND phone_number = ?",
                (user["country_code"], user["phone_number"]),
            )
            tx.execute(
                "DELETE FROM send_cooldowns WHERE phone_key = ?",
                (Phone(user["country_code"], user["phone_number"]).key,),
            )
            tx.execute("DELETE FROM users WHERE uid = ?", (uid,))
            self._revoke(tx, claims)
        log.info("account deleted", extra={"uid": uid, "messages": erased})
        return {"success": True, "message": "账号已注销", "deleted_messages": erased}

    @staticmethod
    def _revoke(tx: Tx, claims: dict[str, Any]) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            return  # every token this service issues has a jti; anything else cannot be revoked by id
        now = now_ms()
        # Revocations are only needed until the token would have expired anyway.
        tx.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))
        if not tx.one("SELECT jti FROM revoked_tokens WHERE jti = ?", (jti[:64],)):
            tx.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?)", (jti[:64], int(claims["exp"]) * 1000)
            )


def mask_phone(number: str) -> str:
    """A phone number safe to show: 138****8000 for long numbers, fewer digits kept for short ones."""
    if len(number) >= 8:
        return number[:3] + "*" * (len(number) - 7) + number[-4:]
    if len(number) >= 4:
        return number[:1] + "*" * (len(number) - 3) + number[-2:]
    return "*" * len(number)


def token_is_live(db: Database, claims: dict[str, Any]) -> bool:
    """Whether a verified token still counts: its user exists and it was not revoked (one query)."""
    jti = claims.get("jti") if isinstance(claims.get("jti"), str) else ""
    row = db.read(
        lambda tx: tx.one(
            "SELECT u.uid, r.jti FROM users u LEFT JOIN revoked_tokens r ON r.jti = ? WHERE u.uid = ?",
            (jti[:64], claims["sub"]),
        )
    )
    return row is not None and row["jti"] is None


def _rate_limited(retry_after_ms: int, message: str) -> ApiError:
    return ApiError("RateLimited", message, retry_after=max(1, -(-retry_after_ms // 1000)))
