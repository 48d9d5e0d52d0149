"""What a tool round adds to /chat/stream: time to first text frame of a one-tool turn vs a plain turn, with
the tool's own latency taken out, on one ChatService in one run.

Both kinds are the same user talking to the same role (wanqing, who has the clock skill), sequential and
interleaved pair by pair (the order alternates: plain-tool, tool-plain, ...), so machine noise and the
growing history hit both alike. The fake upstream sends every frame at once (no delay), so the figures are
our own cost, not a model's.

  plain turn:    one round, the model streams text at once.
  one-tool turn: round 1 streams a call to get_current_time (no provider, runs in well under 1 ms), the
                 engine runs it (tool.start / tool.end x_events), opens round 2 with the result, and round 2
                 streams the same text.

Time to first text frame (TTFT) is from sending the POST to the arrival of the first frame whose
choices[0].delta.content is non-empty. For the tool turn the tool's own latency is subtracted: `ms` of its
tool.end x_event (the registry's measure of the call; an int, so under 1 ms counts as 0), and, as a
stricter second reading, the gap between tool.start's and tool.end's arrival (which also removes the
engine's wait-and-settle plumbing around the call). What is left is the engine's added cost: the second
model round trip and the tool plumbing.

    .venv/bin/python bench/tools.py [--turns 200] [--warmup 10] [--text "..."] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import benchlib as b

from dev.fake_tools import FakeTools

ROLE = "wanqing"
TOOL = "get_current_time"
DEFAULT_TEXT = "现在是下午三点多，窗外的西湖起了点雾，要不要泡杯龙井慢慢聊？"


@dataclass
class Turn:
    """The timings of one turn (seconds, from sending the request); NaN where a frame did not come."""

    meta: float  # first frame (stream.meta)
    text: float  # first non-empty delta.content
    tool_start: float = float("nan")
    tool_end: float = float("nan")
    tool_ms: float = float("nan")  # tool.end's own `ms`, in seconds

    @property
    def text_less_tool_ms(self) -> float:
        """TTFT minus the tool's own latency as the engine reports it."""
        return self.text - self.tool_ms

    @property
    def text_less_tool_gap(self) -> float:
        """TTFT minus the tool.start -> tool.end arrival gap."""
        return self.text - (self.tool_end - self.tool_start)


def read_turn(res: b.StreamResult, *, tool: bool, expected: str) -> Turn | str:
    """The turn's timings, or why it is not a clean turn of its kind."""
    problem = res.problem(expected_text=expected)
    if problem:
        return problem
    nan = float("nan")
    turn = Turn(meta=res.frames[0][0] - res.sent_at, text=nan)
    starts = ends = 0
    for arrival, payload in res.frames:
        if payload == b"[DONE]":
            continue
        frame: dict[str, Any] = json.loads(payload)
        event = frame.get("x_event") or {}
        if event.get("type") == "tool.start":
            starts += 1
            turn.tool_start = arrival - res.sent_at
        elif event.get("type") == "tool.end":
            ends += 1
            if event.get("name") != TOOL or event.get("ok") is not True:
                return f"tool.end not a clean {TOOL}: {event}"
            turn.tool_end = arrival - res.sent_at
            turn.tool_ms = float(event.get("ms") or 0) / 1000
        choices = frame.get("choices") or [{}]
        content = (choices[0].get("delta") or {}).get("content")
        if content and turn.text != turn.text:  # the first non-empty text (NaN until then)
            turn.text = arrival - res.sent_at
    if turn.text != turn.text:
        return "no text frame"
    want = 1 if tool else 0
    if (starts, ends) != (want, want):
        return f"{starts} tool.start / {ends} tool.end frames, expected {want} each"
    if tool and not turn.tool_start < turn.tool_end <= turn.text:
        return "tool frames out of order"
    return turn


def main() -> int:
    """Measure and print the tool-round overhead tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=200, help="measured turns of each kind (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured pairs first (default 10)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the reply text both kinds stream")
    parser.add_argument("--quick", action="store_true", help="40 turns of each kind, 4 warm-up pairs")
    args = parser.parse_args()
    if args.quick:
        args.turns, args.warmup = min(args.turns, 40), min(args.warmup, 4)
    if args.turns < 1:
        parser.error("--turns must be at least 1")

    plain_script = {"text": args.text, "delay": 0}
    tool_scripts = ({"tool_calls": [{"name": TOOL, "arguments": {}}], "delay": 0}, plain_script)
    expected = args.text
    kinds = ("plain", "tool")
    turns: dict[str, list[Turn]] = {k: [] for k in kinds}
    errors: dict[str, list[str]] = {k: [] for k in kinds}
    pairs: list[tuple[Turn, Turn]] = []  # (plain, tool) measured side by side

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(b.temp_dir("aichat-bench-tools-"))
        fake = b.FakeUpstream(delay=0)
        stack.callback(fake.stop)
        # Not called by get_current_time; configured so the role is offered its full tool list, as in production.
        providers = FakeTools().start()
        stack.callback(providers.stop)
        db = b.BenchDB("sqlite", tmp)
        stack.callback(db.close)
        user = db.create_users(1)[0]
        env = b.chat_env(
            db.url,
            fake.base_url,
            **providers.env(),
            AICHAT_CHAT_MESSAGES_PER_MINUTE=100_000,
            AICHAT_CHAT_MAX_CONCURRENT_STREAMS=100,
        )
        server = b.start_chat(env, tmp)
        stack.callback(server.stop)
        b.note(f"{args.warmup} warm-up pairs, then {args.turns} plain + {args.turns} one-tool turns, interleaved")

        started = time.monotonic()
        for i in range(args.warmup + args.turns):
            order = kinds if i % 2 == 0 else kinds[::-1]
            got: dict[str, Turn] = {}
            for kind in order:
                if kind == "plain":
                    fake.script(**plain_script)
                else:
                    for script in tool_scripts:
                        fake.script(**script)
                res = b.sse_post(server.port, "/chat/stream", {"role_code": ROLE, "message": "现在几点了?"}, user.auth)
                out = read_turn(res, tool=kind == "tool", expected=expected)
                if isinstance(out, str):
                    if i < args.warmup:
                        raise SystemExit(f"warm-up {kind} turn failed: {out}\n{server.log()[-3000:]}")
                    errors[kind].append(out)
                    fake.reset()  # a failed turn may leave its second script queued
                    continue
                got[kind] = out
            if i < args.warmup:
                continue
            for kind, turn in got.items():
                turns[kind].append(turn)
            if len(got) == 2:
                pairs.append((got["plain"], got["tool"]))
        elapsed = time.monotonic() - started
        log_problems = b.log_problems(server.log())

    plain, tool = turns["plain"], turns["tool"]
    qs = (50, 90, 99)

    def row(name: str, values: list[float], digits: int = 2) -> list[Any]:
        return [name, len(values), *(b.ms(b.pct(values, q), digits) for q in qs)]

    plain_text = [t.text for t in plain]
    tool_text = [t.text for t in tool]
    less_ms = [t.text_less_tool_ms for t in tool]
    less_gap = [t.text_less_tool_gap for t in tool]
    b.show(
        f"tools: time to first text frame, {ROLE}, one ChatService (SQLite), fake upstream without delay",
        ["turn", "n", "p50", "p90", "p99"],
        [
            row("plain (one round)", plain_text),
            row("one-tool, as measured", tool_text),
            row("one-tool, less tool.end ms", less_ms),
            row("one-tool, less tool.start->end gap", less_gap),
        ],
    )

    rows = []
    for name, values in (("less tool.end ms", less_ms), ("less tool.start->end gap", less_gap)):
        added = [b.pct(values, q) - b.pct(plain_text, q) for q in qs]
        ratios = [b.pct(values, q) / b.pct(plain_text, q) for q in qs]
        rows.append([name, *(b.ms(a) for a in added), *(f"{r:.2f}x" for r in ratios)])
    b.show(
        "tools: added time to first text, one-tool turn minus plain turn (tool latency excluded), per percentile",
        ["tool latency taken out", "added p50", "added p90", "added p99", "ratio p50", "ratio p90", "ratio p99"],
        rows,
    )

    paired = [t.text_less_tool_ms - p.text for p, t in pairs]
    paired_gap = [t.text_less_tool_gap - p.text for p, t in pairs]
    b.show(
        f"tools: added time per interleaved pair (tool minus the plain turn next to it, {len(pairs)} pairs)",
        ["tool latency taken out", "n", "p50", "p90", "p99"],
        [row("less tool.end ms", paired), row("less tool.start->end gap", paired_gap)],
    )

    b.show(
        "tools: where the one-tool turn's time goes (from sending the request)",
        ["phase", "n", "p50", "p90", "p99"],
        [
            row("plain: first frame (stream.meta)", [t.meta for t in plain]),
            row("tool: first frame (stream.meta)", [t.meta for t in tool]),
            row("tool: send -> tool.start (round 1 read to its call)", [t.tool_start for t in tool]),
            row("tool: tool.start -> tool.end (arrival gap)", [t.tool_end - t.tool_start for t in tool], 3),
            row("tool: tool.end ms (the tool's own time)", [t.tool_ms for t in tool], 3),
            row("tool: tool.end -> first text (round 2 opened)", [t.text - t.tool_end for t in tool]),
        ],
    )

    failed = [(kind, len(errs), errs[0]) for kind, errs in errors.items() if errs]
    if failed:
        b.show("tools: failed turns", ["turn", "count", "first problem"], failed)
    if log_problems:
        b.show("tools: warnings and errors in the service log", ["log line", "count"], log_problems)
    b.note(f"{len(plain) + len(tool)} measured turns in {elapsed:.1f} s (warm-up included)")
    b.note("'added' = the one-tool turn's TTFT (its tool's latency taken out) minus the plain turn's")
    b.note("ratio = one-tool turn (tool latency taken out) / plain turn, at the same percentile")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
