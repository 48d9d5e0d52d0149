"""JSON-lines logging that stamps every line with the current request's id."""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import sys
import threading
import time
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else passed via `extra=` becomes a JSON field.
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_second: list = [0, ""]  # the last whole second formatted, and its text: most lines share it


def timestamp(now: float) -> str:
    """UTC `YYYY-MM-DDTHH:MM:SS.mmmZ`, formatting the seconds part once per second."""
    whole = int(now)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a JSON line."""
        line: dict[str, object] = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "request_id": request_id_var.get(),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            # Stack traces go to the log only, never to a response.
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def write_line(logger: logging.Logger, message: str, fields: dict[str, object]) -> None:
    """Write one INFO line, shaped like JsonFormatter's, straight to the handlers of the aichat loggers.

    The access log writes a line per request; LogRecord creation, caller lookup and the generic
    formatter cost about a fifth of a cheap request, so this path skips them.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    line = {
        "ts": timestamp(time.time()),
        "level": "INFO",
        "logger": logger.name,
        "request_id": request_id_var.get(),
        "message": message,
        **fields,
    }
    text = json.dumps(line, ensure_ascii=False, default=str) + "\n"
    target: logging.Logger | None = logger
    while target is not None:
        for handler in target.handlers:
            if getattr(handler, "_aichat", False):
                _write(handler, text)
            else:  # a handler someone else added (e.g. pytest's caplog): give it a normal record
                handler.handle(logging.makeLogRecord({"name": logger.name, "msg": message, **fields}))
        target = target.parent if target.propagate else None


# While other requests are in flight, a line waits (at most BATCH_S) to be written with the others in one
# write: on a busy instance each write is a syscall that gives up the GIL and queues to get it back behind
# the busy threads, which cost ~15 % of a cheap request's throughput. The last request in flight writes
# everything at once, so an idle instance (which FC may freeze) holds no line back. ("In flight": from the
# WSGI call until the server closed the response, web._counted; a stream counts for its whole life.)
BATCH_S = 0.05
_batch: dict[Any, list[str]] = {}
_batch_lock = threading.Lock()
_in_flight = [0]
_flusher: list[threading.Thread] = []


def _write(handler: Any, text: str) -> None:
    with _batch_lock:
        if _in_flight[0] > 1:
            _batch.setdefault(handler, []).append(text)
            if not _flusher:
                _flusher.append(threading.Thread(target=_flush_every, name="aichat-log-flusher", daemon=True))
                _flusher[0].start()
            return
        text = "".join(_batch.pop(handler, ())) + text
    _emit(handler, text)


def _emit(handler: Any, text: str) -> None:
    with handler.lock:
        handler.stream.write(text)
        handler.stream.flush()


def flush_lines() -> None:
    """Write every waiting line now."""
    with _batch_lock:
        waiting = [(handler, "".join(lines)) for handler, lines in _batch.items()]
        _batch.clear()
    for handler, text in waiting:
        _emit(handler, text)


def _flush_every() -> None:
    while True:
        time.sleep(BATCH_S)
        flush_lines()


def request_started() -> None:
    """A request began (web._counted): while others are in flight, lines may wait for a batch."""
    with _batch_lock:
        _in_flight[0] += 1


def request_ended() -> None:
    """A request ended: the last one in flight writes what is waiting."""
    with _batch_lock:
        _in_flight[0] = max(0, _in_flight[0] - 1)
        idle = _in_flight[0] == 0
    if idle:
        flush_lines()


atexit.register(flush_lines)


def configure_logging(level: str = "INFO") -> None:
    """Send the aichat loggers to stderr as JSON lines (idempotent)."""
    root = logging.getLogger("aichat")
    root.setLevel(level)
    if not any(getattr(h, "_aichat", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._aichat = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
