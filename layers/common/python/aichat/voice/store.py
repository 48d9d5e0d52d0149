"""Where synthesised audio is kept: a local directory (the embedded default) or an OSS bucket."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..fc import Credentials
from .oss import OssClient


class LocalStore:
    """Files under one directory; served by the service itself (Content-Length, ETag, Range)."""

    kind = "local"

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError("key escapes the store")
        return path

    def put(self, key: str, data: bytes, content_type: str, creds: Credentials | None = None) -> None:
        """Write atomically: a reader sees the whole file or none."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str, creds: Credentials | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None


class OssStore:
    """Objects under a prefix of one bucket; clients are redirected to a short-lived signed URL."""

    kind = "oss"

    def __init__(self, client: OssClient, prefix: str, url_ttl_s: int) -> None:
        self.client = client
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url_ttl_s = url_ttl_s

    def put(self, key: str, data: bytes, content_type: str, creds: Credentials) -> None:
        self.client.put(self.prefix + key, data, content_type, creds)

    def delete(self, key: str, creds: Credentials) -> None:
        self.client.delete(self.prefix + key, creds)

    def url(self, key: str, creds: Credentials) -> str:
        return self.client.presign_get(self.prefix + key, creds, expires_s=self.url_ttl_s)


Store = LocalStore | OssStore
CredentialSource = Callable[[], Credentials | None]
