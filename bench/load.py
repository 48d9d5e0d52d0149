"""N concurrent slow streams at ONE ChatService instance: errors, time to first frame, total time, memory.

Each stream is a different user (rows inserted directly, tokens signed with the services' key), the fake
upstream (its own process) sends `--frames` pieces `--interval` s apart, and ChatService runs one gunicorn
gthread worker with AICHAT_THREADS = streams + 8. Afterwards the messages table must hold every user
message and every assistant reply exactly once. Memory: the worker's VmRSS after a warm-up stream (idle)
and its peak (VmHWM, reset at the start, plus 20 ms VmRSS samples) during the run.

With --redis-url, the service keeps token liveness, the chat limits and the stream slots in that Redis
(emptied first; slots left open are then counted there).

    .venv/bin/python bench/load.py [--streams 200] [--frames 20] [--interval 0.1] [--mysql]
        [--redis-url redis://127.0.0.1:6379/14] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections import Counter

import benchlib as b

TARGET_MIB_PER_STREAM = 1.0
TARGET_TTFF_P99_S = 0.5
TARGET_CPU_MS_PER_STREAM = 5.0


def main() -> int:
    """Run the load test and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (default 200)")
    parser.add_argument("--frames", type=int, default=20, help="reply pieces per stream (default 20)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between upstream frames (0.1)")
    parser.add_argument("--mysql", action="store_true", help="MariaDB instead of SQLite")
    parser.add_argument("--mysql-url", default=b.DEFAULT_MYSQL_URL)
    parser.add_argument("--redis-url", default="", help="Redis for the service's hot path (emptied first)")
    parser.add_argument("--quick", action="store_true", help="20 streams of 10 frames")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.frames = min(args.streams, 20), min(args.frames, 10)
    n = args.streams

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(b.temp_dir("aichat-bench-load-"))
        db = b.BenchDB("mysql" if args.mysql else "sqlite", tmp, args.mysql_url)
        stack.callback(db.close)
        users = db.create_users(n + 1)
        warm_user, users = users[0], users[1:]
        fake = b.FakeUpstream(delay=args.interval)
        stack.callback(fake.stop)
        env = b.chat_env(db.url, fake.base_url, AICHAT_THREADS=n + 8, AICHAT_LLM_READ_TIMEOUT=60)
        label = db.label
        if args.redis_url:
            if why := b.redis_available(args.redis_url):
                raise SystemExit(f"Redis unreachable at {args.redis_url}: {why}")
            env["AICHAT_REDIS_URL"] = args.redis_url
            label += " + Redis"
        server = b.start_chat(env, tmp)
        stack.callback(server.stop)
        port = server.port
        worker = b.gunicorn_worker(server)
        b.note(f"{n} streams x {args.frames} frames, {args.interval * 1000:.0f} ms apart, {label}, worker {worker}")

        # Warm-up: one complete stream (imports, role sync, first connection), then the idle baseline.
        fake.script(chunks=b.chunks(3), delay=0)
        warm = b.sse_post(port, "/chat/stream", {"role_code": b.ROLE, "message": "warm-up"}, warm_user.auth)
        if warm.problem():
            raise SystemExit(f"warm-up stream failed: {warm.problem()}\n{server.log()[-3000:]}")
        time.sleep(0.5)
        idle = b.proc_status(worker)
        hwm_reset = b.reset_peak_rss(worker)
        cpu_before = b.cpu_seconds(worker)

        pieces = b.chunks(args.frames)
        expected_text = "".join(pieces)
        fake.script(n, chunks=pieces, delay=args.interval)

        results: list[b.StreamResult | None] = [None] * n
        barrier = threading.Barrier(n + 1)
        peak = {"rss": idle["VmRSS"], "threads": idle.get("Threads", 0)}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                with contextlib.suppress(OSError):
                    st = b.proc_status(worker)
                    peak["rss"] = max(peak["rss"], st["VmRSS"])
                    peak["threads"] = max(peak["threads"], st.get("Threads", 0))
                sampling.wait(0.02)

        def one(i: int) -> None:
            barrier.wait()
            body = {"role_code": b.ROLE, "message": f"load message {i}"}
            results[i] = b.sse_post(port, "/chat/stream", body, users[i].auth, timeout=120)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        barrier.wait()
        started = time.time()
        for t in threads:
            t.join(timeout=150)
        total = max((r.ended_at for r in results if r), default=time.time()) - started
        sampling.set()
        sampler.join()
        after = b.proc_status(worker)
        cpu_after = b.cpu_seconds(worker)
        cpu_user, cpu_sys = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        cpu_used = cpu_user + cpu_sys
        log_problems = b.log_problems(server.log())
        peak_kib = max(peak["rss"], after["VmHWM"] if hwm_reset else 0, after["VmRSS"])

        # Every stream must be a clean, complete reply.
        problems = Counter()
        for r in results:
            why = "client thread did not finish" if r is None else r.problem(args.frames + 1, expected_text)
            if why:
                problems[why.split(":")[0][:60]] += 1
        errors = sum(problems.values())
        ttffs = [r.ttff for r in results if r and r.frames]

        # Storage: exactly one user message and one complete assistant reply per stream.
        rows = db.query("SELECT uid, sender_role, content, is_partial FROM messages")
        by_user: dict[str, list[tuple]] = {}
        for uid, sender, content, partial in rows:
            by_user.setdefault(uid, []).append((sender, content, int(partial)))
        stored_ok = dup = missing = wrong = 0
        for i, user in enumerate(users):
            mine = by_user.get(user.uid, [])
            user_msgs = [m for m in mine if m[0] == "user"]
            replies = [m for m in mine if m[0] == "assistant"]
            if len(user_msgs) > 1 or len(replies) > 1:
                dup += 1
            elif not user_msgs or not replies:
                missing += 1
            elif user_msgs[0][1] != f"load message {i}" or replies[0][1] != expected_text or replies[0][2]:
                wrong += 1
            else:
                stored_ok += 1
        slots_left = db.query("SELECT COUNT(*) FROM stream_slots")[0][0]
        if args.redis_url:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            slots_left += sum(client.zcard(key) for key in client.scan_iter("aichat:chat:slots:*"))
            client.close()

    ideal = args.frames * args.interval
    per_stream_kib = (peak_kib - idle["VmRSS"]) / n
    b.show(
        f"load: {n} concurrent streams at one ChatService ({label}),"
        f" {args.frames} frames {args.interval * 1000:.0f} ms apart",
        ["metric", "value", "target", "verdict"],
        [
            ["errors (incomplete / failed streams)", f"{errors} of {n}", "0", "met" if errors == 0 else "MISSED"],
            [
                "stored exactly once (user msg + reply)",
                f"{stored_ok} of {n} (dup {dup}, missing {missing}, wrong {wrong})",
                f"{n}",
                "met" if stored_ok == n else "MISSED",
            ],
            ["stream slots left open after the run", slots_left, "0", "met" if slots_left == 0 else "MISSED"],
            ["time to first frame p50", b.ms(b.pct(ttffs, 50), 1), "", ""],
            [
                "time to first frame p99",
                b.ms(b.pct(ttffs, 99), 1),
                f"<= {TARGET_TTFF_P99_S * 1000:.0f} ms",
                b.verdict(b.pct(ttffs, 99), TARGET_TTFF_P99_S),
            ],
            ["time to first frame max", b.ms(max(ttffs, default=float("nan")), 1), "", ""],
            [
                "total time (all streams)",
                f"{total:.2f} s = {total / ideal:.2f}x one stream's {ideal:.1f} s of frames",
                "",
                "",
            ],
            [
                "worker CPU during the run",
                f"{cpu_used:.2f} s = {cpu_used / n * 1000:.1f} ms per stream"
                f" (user {cpu_user / n * 1000:.1f}, sys {cpu_sys / n * 1000:.1f})",
                f"<= {TARGET_CPU_MS_PER_STREAM:.0f} ms per stream",
                b.verdict(cpu_used / n * 1000, TARGET_CPU_MS_PER_STREAM),
            ],
            ["worker RSS idle (after warm-up)", b.mib(idle["VmRSS"]), "", ""],
            ["worker RSS peak during run", f"{b.mib(peak_kib)} ({'VmHWM' if hwm_reset else 'sampled'})", "", ""],
            ["worker threads peak", peak["threads"], "", ""],
            [
                "RSS per stream above idle",
                b.mib(per_stream_kib),
                f"<= {TARGET_MIB_PER_STREAM:.0f} MiB",
                b.verdict(per_stream_kib / 1024, TARGET_MIB_PER_STREAM),
            ],
        ],
    )
    if problems:
        b.show("load: stream problems", ["problem", "streams"], problems.most_common(10))
    if log_problems:
        b.show("load: warnings and errors in the service log", ["log line", "count"], log_problems)
    b.note("the client (one Python process, one thread per stream) shares the same 2 cores as the service")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
