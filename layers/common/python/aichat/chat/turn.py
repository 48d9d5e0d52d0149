"""The turn engine: the rounds of one reply, which frames reach the client, and the outcome.

Every frame it emits (but `[DONE]`) follows the contract's client rule: a `chat.completion.chunk` whose
`choices[0].delta.content` is a string. Upstream frames that already do are forwarded byte for byte;
others are rebuilt (content null → "", reasoning kept in its own field, tool-call deltas never shown) or
dropped (a usage-only frame: its usage is folded into the last frame). What else a client may want to
know travels in one top-level `x_event` object: `stream.meta` first, `done` last, `error` on the fallback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ApiError
from ..llm import END, StreamBroken, UpstreamStream
from ..sse import DONE_FRAME, PING_FRAME
from .frames import FALLBACK_MESSAGES, MAX_ARGUMENT_CHARS, MAX_CALLS_PER_ROUND, Reply, client_frame, local_frame

__all__ = [
    "FALLBACK_MESSAGES",
    "MAX_ARGUMENT_CHARS",
    "MAX_CALLS_PER_ROUND",
    "Reply",
    "Turn",
    "TurnPolicy",
    "client_frame",
    "local_frame",
]

if TYPE_CHECKING:
    from .tooluse import ToolRounds

log = logging.getLogger("aichat.chat.turn")


@dataclass(frozen=True)
class TurnPolicy:
    """The bounds of one reply (from Settings)."""

    max_chars: int = 20_000
    max_seconds: float = 240.0
    heartbeat_s: float = 15.0
    checkpoint_s: float = 2.0
    save_window_s: float = 45.0


# Two writes reveal a client that closed its socket (the first draws the reset, the second fails).
PROBE_GAP_S = 0.3
# The longest a silent stream goes without looking at its probe flag.
TICK_S = 0.5
# After a checkpoint the database refused, the next one waits this long (the reply itself streams on).
CHECKPOINT_BACKOFF_S = 30.0


class Turn:
    """One reply: reads the upstream round(s), emits the client's frames, stores the reply, reports the outcome.

    `save(reply, partial, message_id)` stores the reply's current state: it inserts it the first time and
    updates that row afterwards, and answers its id, or None when what it answers is gone (cleared,
    deleted). It runs every `checkpoint_s` while text flows, so an instance that dies mid-reply leaves the
    text received so far as a partial reply. `spool(reply, partial, message_id)` keeps a reply the database
    would not take within `save_window_s`. `on_close` callbacks run once however the turn ended.

    With `tools`, a round that ends in tool calls runs them (`tool.start` / `tool.end` frames, heartbeats
    while they run) and opens the next round; `first_calls` are run before the first round (a skill used
    directly), and then `upstream` is None until that round opens.
    """

    def __init__(
        self,
        *,
        upstream: UpstreamStream | None,
        model: str,
        meta: dict[str, Any],
        save: Callable[[Reply, bool, int | None], int | None],
        spool: Callable[[Reply, bool, int | None], None],
        on_close: list[Callable[[], None]],
        policy: TurnPolicy,
        tools: ToolRounds | None = None,
        first_calls: list[dict[str, Any]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.model = model
        self.meta = meta
        self._save = save
        self._spool = spool
        self._on_close = on_close
        self.policy = policy
        self.tools = tools
        self.first_calls = first_calls or []
        self.reply = Reply()
        self.message_id: int | None = None
        self.error_code: str | None = None
        self.outcome = "client_gone"
        self.client_gone = False
        self._probe_asked = False
        self._probe_again: float | None = None
        self._gone = False  # what the reply answers was removed: nothing more is stored
        self._saved = False
        self._closed = False
        self._started = self._last_sent = self._checkpointed_at = time.monotonic()
        self._checkpointed_chars = 0

    def frames(self) -> Iterator[bytes]:
        """The whole SSE body: the meta frame, the reply's frames, the last frame, `[DONE]`."""
        yield local_frame(self.model, x_event={"type": "stream.meta", **self.meta})
        self._started = self._last_sent = time.monotonic()
        try:
            try:
                yield from self._rounds()
            except StreamBroken as exc:
                if self.client_gone:
                    return  # we cut the upstream ourselves: nobody is left to tell; close() keeps what arrived
                self.outcome = f"broken:{exc.code}"
                log.warning("upstream stream broke", extra={"reason": exc.reason, "chars": len(self.reply.text)})
                yield from self._store(partial=True)
                yield self._fallback(exc.code)
                return
            # Stored before [DONE]: a client that refreshes history on [DONE] must see the reply.
            yield from self._store(partial=False)
            self.outcome = "complete"
            usage = self.reply.usage
            finish_reason = self.reply.finish_reason or "stop"
            done = {"type": "done", "message_id": self.message_id, "conversation_id": self.meta.get("conversation_id")}
            done.update(finish_reason=finish_reason, usage=usage)
            extra: dict[str, Any] = {"usage": usage} if usage else {}
            yield local_frame(self.reply.model or self.model, finish_reason=finish_reason, **extra, x_event=done)
            yield DONE_FRAME
        except ApiError as exc:
            # Storing the reply failed after the stream started: report it in-band.
            self.outcome = f"error:{exc.code}"
            yield self._fallback(exc.code)

    def _rounds(self) -> Iterator[bytes]:
        """Model rounds, and the tools between them, until a round answers without calling any."""
        calls = self.first_calls
        tool_rounds = 0
        final = False
        while True:
            if calls:
                assert self.tools is not None
                outcomes = yield from self._run_tools(calls, tool_rounds + 1)
                tool_rounds += 1
                final = tool_rounds >= self.tools.max_rounds
                self._open_next(calls, outcomes, final=final)
            assert self.upstream is not None
            calls = yield from self._round(self.upstream)
            if not calls:
                return
            if self.tools is None or final:
                # Tools it was not offered (or no more rounds): the reply ends with what it said.
                log.info("tool calls past the round cap ignored", extra={"calls": len(calls)})
                self.reply.finish_reason = "stop"
                return

    def _round(self, upstream: UpstreamStream) -> Iterator[bytes]:
        """Relay one model round: its frames, heartbeats while it is silent, probes, the reply's bounds.

        Returns the tool calls the round ended with ([] for none, or when the reply reached its bound)."""
        policy = self.policy
        while True:
            now = time.monotonic()
            # Wake for the next heartbeat, the time bound, a probe's second write, or (at the latest) a tick
            # that notices a probe asked for meanwhile.
            wake = min(self._next_ping(), self._started + policy.max_seconds, now + TICK_S)
            item = upstream.next_event(max(0.0, wake - now))
            now = time.monotonic()
            if item is END:
                break
            if item is None:  # silence
                if now >= self._started + policy.max_seconds:
                    self._cut("time")
                    return []
                ping = self._silence(now)
                if ping:
                    yield ping
                continue
            out = self._take(item)  # type: ignore[arg-type]
            if out is not None:
                self._last_sent = now
                yield out
            if self.reply.chars >= policy.max_chars or now >= self._started + policy.max_seconds:
                self._cut("length" if self.reply.chars >= policy.max_chars else "time")
                return []
            if now - self._checkpointed_at >= policy.checkpoint_s:
                self._checkpoint()
        if not (upstream.done or self.reply.finish_reason):
            raise StreamBroken("NetworkError", "upstream ended before finishing")
        calls = self.reply.round_calls()
        if calls:
            self.reply.next_round()
        return calls

    def _next_ping(self) -> float:
        """When the next comment line is due (a heartbeat, or a probe's second write)."""
        due = self._last_sent + self.policy.heartbeat_s
        return min(due, self._probe_again) if self._probe_again is not None else due

    def _silence(self, now: float) -> bytes | None:
        """A comment line if one is due: ignored by every SSE client, and a write that fails if the client
        is gone (a probe writes twice, PROBE_GAP_S apart)."""
        probing = self._probe_asked or (self._probe_again is not None and now >= self._probe_again)
        if not probing and now < self._last_sent + self.policy.heartbeat_s:
            return None
        self._probe_again = now + PROBE_GAP_S if self._probe_asked else None
        self._probe_asked = False
        self._last_sent = now
        return PING_FRAME

    def _run_tools(self, calls: list[dict[str, Any]], round_no: int) -> Iterator[bytes]:
        """Run one round's calls at once, each within the tool timeout; `tool.start` as each begins,
        `tool.end` as each ends, heartbeats meanwhile. Returns the outcomes in the calls' order."""
        from concurrent.futures import FIRST_COMPLETED, wait

        assert self.tools is not None
        model = self.reply.model or self.model
        running = [self.tools.start(call) for call in calls]
        for run in running:
            event = {"type": "tool.start", "tool_call_id": run.call_id, "name": run.name, "display": run.display}
            yield local_frame(model, x_event=event)
        self._last_sent = time.monotonic()
        pending = list(running)
        timeout = self.tools.timeout_s
        while pending:
            now = time.monotonic()
            ended = [r for r in pending if r.outcome is not None or r.future.done() or now >= r.started + timeout]
            for run in ended:
                pending.remove(run)
                outcome = self.tools.settle(run, timed_out=now >= run.started + timeout)
                event = {"type": "tool.end", "tool_call_id": run.call_id, "name": run.name, "ok": outcome.ok}
                event.update(display=outcome.display, ms=outcome.ms)
                self._last_sent = now
                yield local_frame(model, x_event=event)
            if not pending:
                break
            if self.client_gone:
                raise StreamBroken("NetworkError", "the client left while tools ran")
            ping = self._silence(now)
            if ping:
                yield ping
            wake = min(min(r.started + timeout for r in pending), self._next_ping(), now + TICK_S)
            wait([r.future for r in pending], timeout=max(0.0, wake - time.monotonic()), return_when=FIRST_COMPLETED)
        outcomes = [run.outcome for run in running]
        self.reply.tools.extend({**o.trace(), "round": round_no} for o in outcomes)  # type: ignore[union-attr]
        return outcomes

    def _open_next(self, calls: list[dict[str, Any]], outcomes: list[Any], *, final: bool) -> None:
        """The next model round, told what the tools answered (and, past the cap, offered none)."""
        assert self.tools is not None
        previous = self.upstream
        try:
            upstream = self.tools.open_next(calls, outcomes, final=final)
        except ApiError as exc:
            raise StreamBroken(exc.code, "could not open the next round") from exc
        self.upstream = upstream
        if previous is not None:
            previous.close()  # read to its end: the connection goes back to the pool
        if self.client_gone:
            upstream.abort()

    def _take(self, payload: bytes) -> bytes | None:
        try:
            frame = json.loads(payload)
        except ValueError as exc:
            raise StreamBroken("UpstreamHTTPError", "malformed upstream frame") from exc
        if not isinstance(frame, dict):
            raise StreamBroken("UpstreamHTTPError", "upstream frame is not an object")
        if frame.get("error") and not frame.get("choices"):
            raise StreamBroken("UpstreamHTTPError", "upstream reported an error mid-stream")
        self.reply.add(frame)
        return client_frame(frame, payload)

    def _cut(self, why: str) -> None:
        """The reply reached its bound: it ends here as a complete reply cut for length."""
        log.info("reply cut at its bound", extra={"bound": why, "chars": len(self.reply.text)})
        self.reply.finish_reason = "length"
        if self.upstream is not None:
            self.upstream.abort()  # stop the model generating (and billing) what nobody will read

    def _checkpoint(self) -> None:
        """Store what arrived so far (as partial), so a dying instance leaves it behind; never fails the stream."""
        self._checkpointed_at = time.monotonic()
        if self._gone or self.reply.chars == self._checkpointed_chars:
            return
        try:
            self._persist(partial=True)
            self._checkpointed_chars = self.reply.chars
        except ApiError:
            # Each failed attempt waited out the database's timeout while the stream stood still: back off.
            self._checkpointed_at = time.monotonic() + CHECKPOINT_BACKOFF_S
            log.warning("could not checkpoint a reply; it is stored when it ends")

    def _persist(self, *, partial: bool) -> None:
        stored = self._save(self.reply, partial, self.message_id)
        if stored is None:
            self._gone = True
            self.message_id = None
        else:
            self.message_id = stored

    def _store(self, *, partial: bool) -> Iterator[bytes]:
        """Store the reply as it ended, retrying a database that blinks for up to `save_window_s` (heartbeats
        keep the stream open meanwhile); past that it is spooled, and the client is told."""
        self._saved = True
        if self._gone or (
            partial and not self.reply.text and not self.reply.reasoning_text and self.message_id is None
        ):
            return  # nothing arrived (an empty bubble would only confuse the history), or its message is gone
        deadline = time.monotonic() + self.policy.save_window_s
        pause = 0.2
        while True:
            try:
                self._persist(partial=partial)
                return
            except ApiError:
                if time.monotonic() + pause > deadline:
                    self._spool(self.reply, partial, self.message_id)
                    raise
            log.warning("could not store a reply; retrying", extra={"pause_s": pause})
            yield PING_FRAME
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _fallback(self, code: str) -> bytes:
        """The last frame when the reply could not be completed: the error, and no text of its own.

        The text a client concatenated so far is exactly what was stored (as a partial reply).
        """
        self.error_code = code
        message = FALLBACK_MESSAGES.get(code, FALLBACK_MESSAGES["InternalError"])
        event = {"type": "error", "code": code, "message": message, "message_id": self.message_id}
        event["conversation_id"] = self.meta.get("conversation_id")
        frame = local_frame(self.model, finish_reason="error", error={"code": code, "message": message}, x_event=event)
        return frame + DONE_FRAME

    def probe(self) -> None:
        """The client's socket reached end-of-file (called from another thread): a half-close is legal, so
        write to it (twice) rather than assume it is gone; a closed client makes the second write fail."""
        self._probe_asked = True

    def abort(self) -> None:
        """The client is gone (called from another thread): cut the upstream so a blocked read returns now."""
        self.client_gone = True
        if self.upstream is not None:
            self.upstream.abort()

    def close(self) -> None:
        """End the turn however it went; idempotent. Keeps what arrived if it was never stored."""
        if self._closed:
            return
        self._closed = True
        try:
            # Read to its end, the upstream connection goes back to the pool (no new handshake for the next
            # reply); cut short, closing it drops it.
            if self.upstream is not None:
                self.upstream.close()
            if not self._saved and not self._gone and (self.reply.text or self.reply.reasoning_text):
                self._saved = True
                try:
                    self._persist(partial=True)
                except ApiError:
                    log.error("could not store a partial reply; spooled")
                    self._spool(self.reply, True, self.message_id)
        finally:
            for callback in self._on_close:
                callback()
