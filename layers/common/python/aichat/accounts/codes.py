"""Verification codes and their abuse limits (verification_codes, send_cooldowns): the only code writing them.

With Redis (code_limits.CodeLimits, claimed by the service first) the limits are checked there and the
database only stores the code; without it, or while it is unavailable, the database checks them here."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from ..config import Settings
from ..errors import ApiError
from ..store import Row, Tx, now_ms
from .phone import Phone

if TYPE_CHECKING:
    from .code_limits import CodeLimits

DAY_MS = 86_400_000
# Code row states; only the newest row of a phone can be "live".
PENDING, LIVE, USED, SUPERSEDED, BURNED, FAILED = "pending", "live", "used", "superseded", "burned", "failed"
SENT_STATES = (LIVE, USED, SUPERSEDED, BURNED)
COOLING_DOWN = "验证码发送过于频繁，请稍后再试"
PHONE_CAP = "该手机号今日验证码发送次数已达上限"
IP_CAP = "当前网络今日验证码请求次数已达上限"


def code_hash(settings: Settings, phone: Phone, code: str) -> str:
    """Keyed and bound to the phone: a leaked table neither reveals codes nor lets one be reused elsewhere."""
    return hmac.new(settings.code_secret, f"{phone.key}:{code}".encode(), hashlib.sha256).hexdigest()


def reserve(
    tx: Tx,
    *,
    settings: Settings,
    phone: Phone,
    code: str,
    client_ip: str,
    source_ip: str | None,
    checked: bool = False,
) -> int:
    """Check the abuse limits (unless Redis `checked` them), claim the resend cooldown and store the (not yet
    usable) code."""
    now = now_ms()
    if not checked:
        _check_in_database(tx, settings=settings, phone=phone, client_ip=client_ip, now=now)
    return tx.insert(
        "INSERT INTO verification_codes (country_code, phone_number, code_hash, status, attempts,"
        " client_ip, source_ip, created_at, expires_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
        (
            phone.country_code,
            phone.phone_number,
            code_hash(settings, phone, code),
            PENDING,
            client_ip,
            source_ip,
            now,
            now + settings.code_ttl_s * 1000,
        ),
    )


def _check_in_database(tx: Tx, *, settings: Settings, phone: Phone, client_ip: str, now: int) -> None:
    day_ago = now - DAY_MS
    placeholders = ",".join("?" * len(SENT_STATES))
    per_phone = tx.one(
        "SELECT COUNT(*) AS n, MIN(created_at) AS oldest, MAX(created_at) AS newest FROM verification_codes"
        f" WHERE phone_number = ? AND country_code = ? AND created_at > ? AND status IN ({placeholders})",
        (phone.phone_number, phone.country_code, day_ago, *SENT_STATES),
    )
    cooldown_ms = settings.code_resend_cooldown_s * 1000
    # A code sent while Redis held the cooldown is not in send_cooldowns: the newest sent code says it.
    if per_phone and per_phone["newest"] is not None and per_phone["newest"] + cooldown_ms > now:
        raise rate_limited(per_phone["newest"] + cooldown_ms - now, COOLING_DOWN)
    if per_phone and per_phone["n"] >= settings.code_max_per_phone_per_day:
        raise rate_limited(per_phone["oldest"] + DAY_MS - now, PHONE_CAP)
    per_ip = tx.one(
        "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM verification_codes"
        " WHERE client_ip = ? AND created_at > ?",
        (client_ip, day_ago),
    )
    if per_ip and per_ip["n"] >= settings.code_max_per_ip_per_day:
        raise rate_limited(per_ip["oldest"] + DAY_MS - now, IP_CAP)
    _claim_cooldown(tx, settings=settings, phone=phone, now=now)


def _claim_cooldown(tx: Tx, *, settings: Settings, phone: Phone, now: int) -> None:
    """Atomically take the phone's resend slot, or answer 429 with the seconds left."""
    until = now + settings.code_resend_cooldown_s * 1000
    if tx.execute(
        "UPDATE send_cooldowns SET until_ms = ? WHERE phone_key = ? AND until_ms <= ?", (until, phone.key, now)
    ):
        return
    row = tx.one("SELECT until_ms FROM send_cooldowns WHERE phone_key = ?" + tx.for_update, (phone.key,))
    if row is None:
        claimed = tx.insert_unique("INSERT INTO send_cooldowns (phone_key, until_ms) VALUES (?, ?)", (phone.key, until))
        if claimed is not None:  # (its "id" is 0 on MySQL: the table has no AUTO_INCREMENT column)
            return
        row = {"until_ms": until}  # another instance claimed it a moment ago
    raise rate_limited(row["until_ms"] - now, COOLING_DOWN)


def send_failed(tx: Tx, *, phone: Phone, code_id: int) -> None:
    """Make an unsent code unusable and give the phone its resend slot back."""
    tx.execute("UPDATE verification_codes SET status = ? WHERE id = ?", (FAILED, code_id))
    tx.execute("UPDATE send_cooldowns SET until_ms = 0 WHERE phone_key = ?", (phone.key,))


def activate(tx: Tx, *, phone: Phone, code_id: int, provider_request_id: str) -> None:
    """Make a sent code the phone's only live one."""
    tx.execute(
        "UPDATE verification_codes SET status = ? WHERE phone_number = ? AND country_code = ? AND status = ?"
        " AND id <> ?",
        (SUPERSEDED, phone.phone_number, phone.country_code, LIVE, code_id),
    )
    tx.execute(
        "UPDATE verification_codes SET status = ?, provider_request_id = ? WHERE id = ?",
        (LIVE, provider_request_id[:128], code_id),
    )


def consume(tx: Tx, *, settings: Settings, phone: Phone, code: str, limits: CodeLimits | None = None) -> bool:
    """Check the phone's newest live code: consume it (True), or count a miss (False; committed by the caller).

    With Redis the guesses are counted there, before the check, so parallel guesses cannot pass the limit;
    the code's row is only written when it is used or burned. Its attempts column counts the guesses made
    while Redis was away, and the limit applies to both counts' sum."""
    if limits is not None:
        row = _live_code(tx, phone=phone, lock=False)
        if row is None or row["expires_at"] <= now_ms() or row["attempts"] >= settings.code_max_attempts:
            return False
        guesses = limits.guess(phone=phone, code_id=row["id"], ttl_ms=row["expires_at"] - now_ms())
        if guesses is not None:
            spent = row["attempts"] + guesses
            right = spent <= settings.code_max_attempts and hmac.compare_digest(
                row["code_hash"], code_hash(settings, phone, code)
            )
            if right:
                return _use(tx, row["id"])
            if spent >= settings.code_max_attempts:  # dead in the database too, whatever Redis does next
                tx.execute(
                    "UPDATE verification_codes SET status = ? WHERE id = ? AND status = ?", (BURNED, row["id"], LIVE)
                )
            return False
    row = _live_code(tx, phone=phone, lock=True)
    if row is None or row["expires_at"] <= now_ms() or row["attempts"] >= settings.code_max_attempts:
        return False
    if not hmac.compare_digest(row["code_hash"], code_hash(settings, phone, code)):
        attempts = row["attempts"] + 1
        status = BURNED if attempts >= settings.code_max_attempts else LIVE
        tx.execute("UPDATE verification_codes SET attempts = ?, status = ? WHERE id = ?", (attempts, status, row["id"]))
        return False
    return _use(tx, row["id"])


def _live_code(tx: Tx, *, phone: Phone, lock: bool) -> Row | None:
    return tx.one(
        "SELECT id, code_hash, attempts, expires_at FROM verification_codes"
        " WHERE phone_number = ? AND country_code = ? AND status = ? ORDER BY id DESC LIMIT 1"
        + (tx.for_update if lock else ""),
        (phone.phone_number, phone.country_code, LIVE),
    )


def _use(tx: Tx, code_id: int) -> bool:
    # The status guard makes the code single-use even if two logins race.
    return bool(
        tx.execute("UPDATE verification_codes SET status = ? WHERE id = ? AND status = ?", (USED, code_id, LIVE))
    )


def delete_for_phone(tx: Tx, *, phone: Phone) -> None:
    """Account deletion: the phone's codes and cooldown."""
    tx.execute(
        "DELETE FROM verification_codes WHERE country_code = ? AND phone_number = ?",
        (phone.country_code, phone.phone_number),
    )
    tx.execute("DELETE FROM send_cooldowns WHERE phone_key = ?", (phone.key,))


def rate_limited(retry_after_ms: int, message: str) -> ApiError:
    """429 RateLimited with the whole seconds until it lifts."""
    return ApiError("RateLimited", message, retry_after=max(1, -(-retry_after_ms // 1000)))
