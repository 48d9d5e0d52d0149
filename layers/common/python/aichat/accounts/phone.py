"""Phone numbers: validation of a request's phone fields, and masking for display and logs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config import TestAccount
from ..errors import ApiError

COUNTRY_CODE = re.compile(r"[0-9]{1,4}")
CN_MOBILE = re.compile(r"1[0-9]{10}")
INTL_NUMBER = re.compile(r"[0-9]{4,15}")


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


def string_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    """A string field of the body: missing or not a string is InvalidInput (format checks come after)."""
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise ApiError("InvalidInput", f"缺少必填参数 {name}")
        return None
    if not isinstance(value, str):
        raise ApiError("InvalidInput", f"参数 {name} 必须是字符串")
    return value.strip()


def parse_phone(body: dict[str, Any], test_account: TestAccount | None) -> Phone:
    """Validate phone_number and country_code (default 86) or raise InvalidPhoneNumber."""
    phone_number = string_field(body, "phone_number")
    country_code = (string_field(body, "country_code", required=False) or "86").lstrip("+")
    if not COUNTRY_CODE.fullmatch(country_code):
        raise ApiError("InvalidPhoneNumber")
    phone = Phone(country_code, phone_number or "")
    if is_test_account(phone, test_account):
        return phone
    pattern = CN_MOBILE if country_code == "86" else INTL_NUMBER
    if not pattern.fullmatch(phone.phone_number):
        raise ApiError("InvalidPhoneNumber")
    return phone


def is_test_account(phone: Phone, test_account: TestAccount | None) -> bool:
    """Whether this is the configured test account (never sent an SMS, exempt from limits)."""
    return test_account is not None and test_account.matches(phone.country_code, phone.phone_number)


def mask_phone(number: str) -> str:
    """A phone number safe to show: 138****8000 for long numbers, fewer digits kept for short ones."""
    if len(number) >= 8:
        return number[:3] + "*" * (len(number) - 7) + number[-4:]
    if len(number) >= 4:
        return number[:1] + "*" * (len(number) - 3) + number[-2:]
    return "*" * len(number)
