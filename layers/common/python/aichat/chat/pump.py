"""An upstream's frames read on a thread of their own, so a turn can act while the upstream is silent:
send heartbeats, probe a client that half-closed its socket, cut a reply that runs over its time."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from ..llm import UpstreamStream

# What get() answers besides a frame's payload.
TICK = object()  # nothing arrived within the timeout
PROBE = object()  # poke(): someone asked the turn to check on its client now
_END = object()


class Pump:
    """Moves one upstream's payloads to the turn through a queue; the thread ends with the upstream."""

    def __init__(self, upstream: UpstreamStream) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(upstream.frames(),), name="aichat-pump", daemon=True)
        self._thread.start()

    def _run(self, frames: Iterator[bytes]) -> None:
        try:
            for payload in frames:
                self._queue.put(payload)
        except BaseException as exc:  # noqa: BLE001 - handed to the turn's thread, which raises it there
            self._queue.put(exc)
        else:
            self._queue.put(_END)

    def get(self, timeout: float) -> object:
        """The next payload, TICK after `timeout` seconds of silence, PROBE, or None at the upstream's end.

        An exception the upstream raised (StreamBroken) is raised here.
        """
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return TICK
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def poke(self) -> None:
        """Wake the turn with PROBE (from another thread)."""
        self._queue.put(PROBE)
