"""Server-sent events: encoding our frames, and parsing an upstream's stream by the SSE specification's rules."""

from __future__ import annotations

import json
import re
from typing import Any

DONE_FRAME = b"data: [DONE]\n\n"
# A comment line: every SSE client ignores it, and so does the contract's rule (it is not a data: line).
PING_FRAME = b": ping\n\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON with readable Chinese (no \\u escapes), as DashScope itself sends."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def data_frame(payload: bytes) -> bytes:
    """One `data:` event around an already serialised payload."""
    return b"data: " + payload + b"\n\n"


def encode(obj: Any) -> bytes:
    """One `data:` event carrying `obj` as JSON."""
    return data_frame(dumps(obj))


class EventTooLong(ValueError):
    """An upstream event grew past the size limit before it ended."""


class EventParser:
    """An incremental parser of an SSE byte stream, following the WHATWG rules.

    Lines end in CRLF, LF or a lone CR; `data:` lines of one event are joined with LF; an event is
    dispatched at a blank line; comments and other fields are ignored; a leading BOM is skipped; data
    still pending when the stream ends is discarded.
    """

    def __init__(self, *, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._buffer = b""
        self._data: list[bytes] = []
        self._size = 0
        self._at_start = True
        self._after_cr = False  # the last chunk ended in CR: a LF opening the next one completes that CRLF

    def feed(self, chunk: bytes) -> list[bytes]:
        """Take the next bytes; return the data of every event they complete, in order."""
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = False
        buffer = self._buffer + chunk if self._buffer else chunk
        if self._at_start:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer  # could still become a BOM
                return []
            self._at_start = False
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        events: list[bytes] = []
        pos = 0
        end = len(buffer)
        for match in _LINE_END.finditer(buffer):
            self._line(buffer[pos : match.start()], events)
            pos = match.end()
        # A CR at the very end ends its line now (no waiting); if it was half of a CRLF, the LF is dropped.
        self._after_cr = pos == end and end > 0 and buffer[-1:] == b"\r"
        self._buffer = buffer[pos:]
        if len(self._buffer) + self._size > self._max:
            raise EventTooLong("upstream event too long")
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
            self._data, self._size = [], 0
            return
        if line[:1] == b":":
            return  # a comment (": ping")
        name, colon, value = line.partition(b":")
        if name != b"data":
            return  # event:, id:, retry: and unknown fields carry nothing we relay
        if colon and value[:1] == b" ":
            value = value[1:]
        self._data.append(value)
        self._size += len(value) + 1
