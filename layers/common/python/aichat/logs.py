"""JSON-lines logging that stamps every line with the current request's id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

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
                with handler.lock:  # type: ignore[union-attr]
                    handler.stream.write(text)  # type: ignore[attr-defined]
                    handler.stream.flush()  # type: ignore[attr-defined]
            else:  # a handler someone else added (e.g. pytest's caplog): give it a normal record
                handler.handle(logging.makeLogRecord({"name": logger.name, "msg": message, **fields}))
        target = target.parent if target.propagate else None


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
