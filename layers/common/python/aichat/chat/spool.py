"""Replies the database would not take within the save window, kept on the instance's disk until it does.

FC keeps /tmp for an instance's whole life, across requests; a drainer thread retries every few seconds
and the initializer drains what an earlier process of the same instance left behind.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ApiError

log = logging.getLogger("aichat.chat.spool")

RETRY_S = 5.0


class Spool:
    """A directory of reply records; `write(record)` stores one (raising ApiError while the DB is down)."""

    def __init__(self, directory: str, write: Callable[[dict[str, Any]], Any]) -> None:
        self.directory = Path(directory)
        self._write = write
        self._lock = threading.Lock()
        self._drainer: threading.Thread | None = None

    def put(self, record: dict[str, Any]) -> None:
        """Keep one record (atomically: a crash leaves a whole file or none) and start draining."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
            tmp = self.directory / f".{name}.tmp"
            tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.directory / f"{name}.json")
        except OSError:
            log.exception("could not spool a reply; it is lost")
            return
        log.warning(
            "reply spooled until the database is back", extra={"conversation_id": record.get("conversation_id")}
        )
        self._start()

    def pending(self) -> list[Path]:
        """The records waiting, oldest first."""
        return sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []

    def drain(self) -> int:
        """Store what is waiting, oldest first; stop at the first refusal (the DB is still down)."""
        written = 0
        with self._lock:
            for path in self.pending():
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    log.error("dropping an unreadable spool file", extra={"file": path.name})
                    path.unlink(missing_ok=True)
                    continue
                try:
                    self._write(record)
                except ApiError:
                    break
                path.unlink(missing_ok=True)
                written += 1
        if written:
            log.info("spooled replies stored", extra={"replies": written})
        return written

    def _start(self) -> None:
        with self._lock:
            if self._drainer is not None and self._drainer.is_alive():
                return
            self._drainer = threading.Thread(target=self._drain_until_empty, name="aichat-spool", daemon=True)
            self._drainer.start()

    def _drain_until_empty(self) -> None:
        while self.pending():
            time.sleep(RETRY_S)
            try:
                self.drain()
            except Exception:  # the drainer must outlive one bad round
                log.exception("spool drain failed")
