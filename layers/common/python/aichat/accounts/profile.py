"""The rules for what an account holds: username, email, nickname, avatar URL, bio (pure checks)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import urlsplit

from ..errors import ApiError

USERNAME_RE = re.compile(r"[A-Za-z0-9_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]{3,20}")
# Syntax only (one @, a dotted domain, no spaces or angle brackets); the address is not proven to exist.
EMAIL_RE = re.compile(
    r"[^@\s<>()\[\],;:\"]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
LIMITS = {"nickname": 32, "bio": 200, "avatar_url": 512}


def username(value: Any) -> tuple[str, str]:
    """(the username as given, after NFKC; its case-insensitive key) or 400 naming the field."""
    if not isinstance(value, str) or not value:
        raise ApiError("InvalidInput", "缺少必填参数 username")
    shown = unicodedata.normalize("NFKC", value).strip()
    if not USERNAME_RE.fullmatch(shown):
        raise ApiError("InvalidInput", "参数 username 必须是 3–20 个字母、数字、下划线或汉字")
    return shown, shown.casefold()


def email(value: Any) -> tuple[str, str] | tuple[None, None]:
    """(the address, its key) or (None, None) when absent; 400 for one that is not an address."""
    if value is None or value == "":
        return None, None
    if not isinstance(value, str) or len(value) > 254 or not EMAIL_RE.fullmatch(value.strip()):
        raise ApiError("InvalidInput", "参数 email 不是有效的邮箱地址")
    address = value.strip()
    local, _, domain = address.rpartition("@")
    return address, f"{local}@{domain.lower()}".casefold()


def text(value: Any, field: str) -> str | None:
    """A short profile text (nickname, bio): NFKC, trimmed, no control characters; None clears it."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError("InvalidInput", f"参数 {field} 必须是字符串")
    cleaned = unicodedata.normalize("NFKC", value).strip()
    if any(unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\n" for ch in cleaned):
        raise ApiError("InvalidInput", f"参数 {field} 含有控制字符")
    if field == "nickname" and "\n" in cleaned:
        raise ApiError("InvalidInput", "参数 nickname 不能换行")
    if len(cleaned) > LIMITS[field]:
        raise ApiError("InvalidInput", f"参数 {field} 最多 {LIMITS[field]} 个字符")
    return cleaned or None


def avatar_url(value: Any) -> str | None:
    """An https URL to an image (≤ 512 characters), or None to clear it."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > LIMITS["avatar_url"]:
        raise ApiError("InvalidInput", "参数 avatar_url 必须是不超过 512 个字符的 https 地址")
    parts = urlsplit(value.strip())
    if (
        parts.scheme != "https"
        or not parts.hostname
        or parts.username
        or parts.password
        or any(c.isspace() for c in value)
    ):
        raise ApiError("InvalidInput", "参数 avatar_url 必须是 https 地址")
    return value.strip()


def mask_email(address: str | None) -> str | None:
    """a***@example.com"""
    if not address:
        return None
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"
