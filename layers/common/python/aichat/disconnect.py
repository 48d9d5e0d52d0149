"""Noticing that a streaming client hung up while the relay waits on a silent upstream.

Writing to a closed client fails only when the next frame arrives; an upstream that thinks for a long
time would keep the model generating (and billing) and the user's stream slot taken. One daemon thread
per process watches the client sockets of open streams and calls back when one reaches end-of-file.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("aichat.disconnect")


class DisconnectWatcher:
    """Watches client sockets for end-of-file and runs each one's callback once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    def _start(self) -> selectors.BaseSelector:
        # Started on first use (under the lock), so processes that never stream pay nothing.
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            threading.Thread(target=self._loop, name="aichat-disconnect", daemon=True).start()
        return self._selector

    def watch(
        self, sock: socket.socket, on_gone: Callable[[], None], on_eof: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        """Call `on_gone` if the peer of `sock` resets it, `on_eof` (default: `on_gone`) when it reaches
        end-of-file; returns a function that stops watching.

        End-of-file alone does not prove the client left: a client may half-close its socket after a
        complete request and still read the answer; the caller can find out by writing to it.
        """
        with self._lock:
            selector = self._start()
            try:
                key = selector.register(sock.fileno(), selectors.EVENT_READ, (sock, on_gone, on_eof or on_gone))
            except (ValueError, KeyError, OSError):
                return lambda: None  # closed already, or watched twice: nothing to do
        self._wake()

        def unwatch() -> None:
            with self._lock, contextlib.suppress(KeyError, ValueError, OSError):
                if selector.get_key(key.fd).data is key.data:
                    selector.unregister(key.fd)

        return unwatch

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")  # type: ignore[union-attr]

    def _loop(self) -> None:
        # The one thread that notices hang-ups for the whole process: whatever goes wrong in one round, it
        # logs it and goes on (dying silently would end disconnect detection for every later stream).
        while True:
            try:
                self._round()
            except Exception:
                log.exception("disconnect watcher round failed")
                time.sleep(0.1)

    def _round(self) -> None:
        assert self._selector is not None
        for key, _ in self._selector.select():
            if key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)  # type: ignore[union-attr]
                continue
            sock, on_gone, on_eof = key.data
            callback = on_eof
            try:
                peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                peeked, callback = b"", on_gone  # a reset: the client is gone for sure
            with self._lock, contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(key.fd)
            if peeked:
                continue  # the client sent more data (a pipelined request): not a hang-up; stop watching
            try:
                callback()
            except Exception:
                log.exception("disconnect callback failed")


watcher = DisconnectWatcher()
