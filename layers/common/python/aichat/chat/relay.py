"""The transport of one SSE body: frames out, a watch on the client's socket, cleanup exactly once.

It knows nothing of chats: it is handed the frames, what to do when the client hangs up and what to run
when the body closes, and it reports how the stream went (frames sent, the outcome) to its listeners.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..disconnect import watcher


@dataclass(frozen=True)
class RelayOutcome:
    """How one stream went, for the access log."""

    outcome: str
    frames: int


class StreamRelay:
    """A WSGI response body: the WSGI server calls close() however the response ends, even if never iterated."""

    def __init__(
        self,
        frames: Iterator[bytes],
        *,
        client: socket.socket | None,
        on_client_gone: Callable[[], None],
        on_client_eof: Callable[[], None],
        on_close: Callable[[], None],
        outcome: Callable[[], str],
    ) -> None:
        self._frames = frames
        self._on_close = on_close
        self._outcome = outcome
        self._listeners: list[Callable[[RelayOutcome], None]] = []
        self.frames_sent = 0
        self._closed = False
        self._unwatch = watcher.watch(client, on_client_gone, on_client_eof) if client is not None else _nothing

    def __iter__(self) -> StreamRelay:
        return self

    def __next__(self) -> bytes:
        try:
            frame = next(self._frames)
        except StopIteration:
            self.close()
            raise
        self.frames_sent += 1
        return frame

    def add_listener(self, listener: Callable[[RelayOutcome], None]) -> None:
        """Be told the outcome when the stream closes (the web glue's access log)."""
        self._listeners.append(listener)

    def close(self) -> None:
        """End the stream early or after the fact; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._frames.close()  # type: ignore[attr-defined]
        finally:
            self._unwatch()
            try:
                self._on_close()
            finally:
                result = RelayOutcome(outcome=self._outcome(), frames=self.frames_sent)
                for listener in self._listeners:
                    listener(result)


def _nothing() -> None:
    return None
