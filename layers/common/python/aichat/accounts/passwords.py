"""Password hashing (argon2id, OWASP's parameters) and the password rules; argon2-cffi loaded lazily."""

from __future__ import annotations

import threading
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ApiError

# OWASP's minimum for argon2id: 19 MiB, 2 iterations, 1 lane (README: the measured cost).
MEMORY_KIB = 19_456
TIME_COST = 2
PARALLELISM = 1
MIN_LENGTH = 8
MAX_LENGTH = 128

_lock = threading.Lock()
_hasher: Any = None
_dummy: str | None = None


def hasher() -> Any:
    """The PasswordHasher (imported on first use: FC's initializer warms it)."""
    global _hasher
    if _hasher is None:
        with _lock:
            if _hasher is None:
                from argon2 import PasswordHasher

                _hasher = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_KIB, parallelism=PARALLELISM)
    return _hasher


def dummy_hash() -> str:
    """A hash of nothing anyone knows: an unknown account is verified against it, so it costs the same."""
    global _dummy
    if _dummy is None:
        import secrets

        _dummy = hasher().hash(secrets.token_urlsafe(24))
    return _dummy


def normalise(password: str) -> str:
    """What is hashed: the password in Unicode NFKC (so the same text typed two ways is one password)."""
    return unicodedata.normalize("NFKC", password)


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    path = Path(__file__).with_name("common_passwords.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().casefold() for line in lines if line.strip() and not line.startswith("#"))


def check_policy(password: Any, *, field: str, username: str | None = None) -> str:
    """The normalised password, or 400 InvalidInput naming the field and the rule it breaks."""
    if not isinstance(password, str) or not password:
        raise ApiError("InvalidInput", f"缺少必填参数 {field}")
    value = normalise(password)
    if not MIN_LENGTH <= len(value) <= MAX_LENGTH:
        raise ApiError("InvalidInput", f"参数 {field} 长度必须在 {MIN_LENGTH} 到 {MAX_LENGTH} 个字符之间")
    if username and value.casefold() == normalise(username).casefold():
        raise ApiError("InvalidInput", f"参数 {field} 不能与用户名相同")
    if value.casefold() in common_passwords():
        raise ApiError("InvalidInput", f"参数 {field} 太常见，请换一个更难猜的密码")
    return value


def hash_password(value: str) -> str:
    """The PHC string stored for a (normalised) password."""
    return hasher().hash(value)


def verify(stored: str | None, value: str) -> tuple[bool, str | None]:
    """(matches, a new hash when the stored one uses older parameters). An account without a password is
    checked against the dummy hash, so it takes as long as a wrong password."""
    from argon2.exceptions import InvalidHashError, VerificationError

    ph = hasher()
    try:
        ph.verify(stored or dummy_hash(), value)
    except (VerificationError, InvalidHashError):
        return False, None
    if stored is None:
        return False, None
    return True, (ph.hash(value) if ph.check_needs_rehash(stored) else None)


def preload() -> None:
    """FC's initializer: import argon2 and make the dummy hash before the first login needs them."""
    dummy_hash()
