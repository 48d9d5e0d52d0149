"""Does time to first frame of /chat/stream depend on how much is stored? One user with 1k messages and
one with 100k (same role), among 1M rows of other users (10k users, 3 roles), all in the messages table.

Rows are bulk-inserted straight into the database (executemany; PyMySQL sends multi-row INSERTs), the two
users' rows shuffled among the others' as if written over time. The ChatService starts after the data is
in; requests alternate between the two users (sequential, order rotating each round). Informational: one
GET /chat/history per user (it returns the whole conversation).

    .venv/bin/python bench/scale.py [--small 1000] [--large 100000] [--others 1000000] [--mysql] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import time
from collections.abc import Iterator

import benchlib as b

TARGET_RATIO = 1.2
ROLES = ("naitang", "wanqing", "dudu")


def rows(
    small: tuple[str, int], large: tuple[str, int], others: int, per_user: int = 100
) -> Iterator[tuple[str, str, str, str, int, int, int]]:
    """Message rows in insertion (id) order: the two users' conversations spread among everyone else's."""
    other_uids = [secrets.token_hex(12) for _ in range(max(1, others // per_user))]
    owners = bytearray(others) + bytearray(b"\x01" * small[1]) + bytearray(b"\x02" * large[1])
    random.Random(42).shuffle(owners)
    start = int(time.time() * 1000) - len(owners) * 10
    turn = {1: 0, 2: 0}
    for i, owner in enumerate(owners):
        if owner == 0:
            uid, role, k = other_uids[i % len(other_uids)], ROLES[i % 3], i // len(other_uids)
        else:
            uid, role, k = (small if owner == 1 else large)[0], b.ROLE, turn[owner]
            turn[owner] += 1
        sender = "user" if k % 2 == 0 else "assistant"
        yield uid, role, sender, f"第{k}条：今天过得怎么样？我们聊聊天吧。", 0, 0, start + i * 10


def main() -> int:
    """Fill the database, measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1_000, help="messages of the small conversation (1k)")
    parser.add_argument("--large", type=int, default=100_000, help="messages of the large conversation (100k)")
    parser.add_argument("--others", type=int, default=1_000_000, help="rows of other users (1M)")
    parser.add_argument("--requests", type=int, default=30, help="measured streams per user (default 30)")
    parser.add_argument("--mysql", action="store_true", help="MariaDB instead of SQLite")
    parser.add_argument("--mysql-url", default=b.DEFAULT_MYSQL_URL)
    parser.add_argument("--quick", action="store_true", help="1k vs 10k among 100k rows, 8 streams each")
    args = parser.parse_args()
    if args.quick:
        args.large, args.others, args.requests = min(args.large, 10_000), min(args.others, 100_000), 8

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(b.temp_dir("aichat-bench-scale-"))
        db = b.BenchDB("mysql" if args.mysql else "sqlite", tmp, args.mysql_url)
        stack.callback(db.close)
        small_user, large_user = db.create_users(2)
        t0 = time.perf_counter()
        inserted = db.insert_messages(
            rows((small_user.uid, args.small), (large_user.uid, args.large), args.others), batch=50_000
        )
        fill_s = time.perf_counter() - t0
        counts = dict(
            db.query(
                "SELECT uid, COUNT(*) FROM messages WHERE uid IN (?, ?) GROUP BY uid", (small_user.uid, large_user.uid)
            )
        )
        b.note(f"{inserted:,} rows inserted into {db.label} in {fill_s:.1f} s ({inserted / fill_s:,.0f} rows/s)")

        fake = b.FakeUpstream(delay=0)
        stack.callback(fake.stop)
        env = b.chat_env(
            db.url, fake.base_url, AICHAT_CHAT_MESSAGES_PER_MINUTE=100_000, AICHAT_CHAT_MAX_CONCURRENT_STREAMS=100
        )
        server = b.start_chat(env, tmp)
        stack.callback(server.stop)
        users = {f"{counts[small_user.uid]:,} messages": small_user, f"{counts[large_user.uid]:,} messages": large_user}
        pieces = b.chunks(3)
        ttff: dict[str, list[float]] = {name: [] for name in users}
        errors: dict[str, list[str]] = {name: [] for name in users}
        names = list(users)
        for rnd in range(args.requests + 2):  # two warm-up rounds
            for name in names if rnd % 2 == 0 else names[::-1]:
                fake.script(chunks=pieces, delay=0)
                res = b.sse_post(
                    server.port, "/chat/stream", {"role_code": b.ROLE, "message": "在吗"}, users[name].auth
                )
                problem = res.problem(len(pieces) + 1, "".join(pieces))
                if rnd < 2:
                    continue
                if problem:
                    errors[name].append(problem)
                else:
                    ttff[name].append(res.ttff)
        history = {}
        for name, user in users.items():
            started = time.perf_counter()
            status, body = b.http_get(server.port, f"/chat/history?role_code={b.ROLE}", user.auth, timeout=120)
            elapsed = time.perf_counter() - started
            n = len(json.loads(body).get("messages", [])) if status == 200 else 0
            history[name] = (status, elapsed, len(body), n)
        log_problems = b.log_problems(server.log())

    small, large = names
    rows_out = []
    for name in names:
        p50, p99 = b.pct(ttff[name], 50), b.pct(ttff[name], 99)
        is_large = name == large
        r50 = p50 / b.pct(ttff[small], 50)
        r99 = p99 / b.pct(ttff[small], 99)
        rows_out.append(
            [
                name,
                len(ttff[name]),
                len(errors[name]),
                b.ms(p50),
                b.ms(p99),
                f"{r50:.2f}x" if is_large else "",
                f"{r99:.2f}x" if is_large else "",
                f"p50 <= {TARGET_RATIO}x" if is_large else "",
                b.verdict(r50, TARGET_RATIO) if is_large else "",
            ]
        )
    b.show(
        f"scale: /chat/stream time to first frame, {db.label}, {args.others:,} rows of other users in messages",
        ["conversation", "n", "errors", "p50", "p99", "p50 ratio", "p99 ratio", "target", "verdict"],
        rows_out,
    )
    b.show(
        "scale: GET /chat/history for the same users (informational: it returns the whole conversation)",
        ["conversation", "status", "time", "body", "messages returned"],
        [[name, s, f"{t:.3f} s", f"{size / 1e6:.2f} MB", f"{n:,}"] for name, (s, t, size, n) in history.items()],
    )
    if any(errors.values()):
        b.show(
            "scale: failed streams",
            ["conversation", "count", "first problem"],
            [[n, len(e), e[0]] for n, e in errors.items() if e],
        )
    if log_problems:
        b.show("scale: warnings and errors in the service log", ["log line", "count"], log_problems)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
