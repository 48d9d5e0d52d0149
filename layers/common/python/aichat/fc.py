"""What Function Compute hands a request besides the HTTP request itself."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Credentials:
    """Alibaba Cloud credentials; on FC, the role's temporary ones arrive with every request."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
