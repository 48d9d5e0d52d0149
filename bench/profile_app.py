"""Profile one ChatService endpoint in-process: the real app module (functions/chat/app.py) imported with a
bench environment and driven through WSGI calls under cProfile, without gunicorn or HTTP in the way.

It prints the mean in-process time per request and the top functions by own time and by cumulative time,
which is how the benchmark figures are traced back to code. Streams talk to the fake upstream (a
subprocess, frames without delay), so their profile is the per-request setup plus a short relay.

    .venv/bin/python bench/profile_app.py history|roles|stream [--requests 500] [--mysql] [--redis-url URL]
        [--top 25] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import os
import pstats
import sys
import time
from typing import Any

import benchlib as b


def call(app: Any, environ: dict[str, Any], body: bytes = b"") -> tuple[str, bytes]:
    """One WSGI call: (status line, body), with the response iterated fully and closed."""
    env = dict(environ)
    env["wsgi.input"] = io.BytesIO(body)
    status: list[str] = []

    def start_response(s: str, headers: list, exc_info: Any = None) -> None:
        status.append(s)

    result = app(env, start_response)
    try:
        data = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return status[0], data


def main() -> int:
    """Profile and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("endpoint", choices=["roles", "history", "stream"])
    parser.add_argument("--requests", type=int, default=500, help="profiled requests (default 500)")
    parser.add_argument("--messages", type=int, default=50, help="stored messages of the user (default 50)")
    parser.add_argument("--mysql", action="store_true", help="MariaDB instead of SQLite")
    parser.add_argument("--mysql-url", default=b.DEFAULT_MYSQL_URL)
    parser.add_argument("--redis-url", default="", help="with Redis (e.g. redis://127.0.0.1:6379/14; emptied)")
    parser.add_argument("--frames", type=int, default=3, help="reply pieces per stream (default 3)")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    parser.add_argument("--quick", action="store_true", help="50 requests")
    args = parser.parse_args()
    if args.quick:
        args.requests = min(args.requests, 50)

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(b.temp_dir("aichat-bench-prof-"))
        db = b.BenchDB("mysql" if args.mysql else "sqlite", tmp, args.mysql_url)
        stack.callback(db.close)
        user = db.create_users(1)[0]
        now = int(time.time() * 1000) - 3_600_000
        db.insert_messages(
            (user.uid, b.ROLE, "user" if i % 2 == 0 else "assistant", f"第{i}条消息：今天天气不错。", 0, 0, now + i)
            for i in range(args.messages)
        )
        fake = b.FakeUpstream(delay=0)
        stack.callback(fake.stop)
        env = b.chat_env(
            db.url,
            fake.base_url,
            AICHAT_CHAT_MESSAGES_PER_MINUTE=1_000_000,
            AICHAT_CHAT_MAX_CONCURRENT_STREAMS=1000,
            AICHAT_LOG_LEVEL="INFO",
        )
        if args.redis_url:
            if why := b.redis_available(args.redis_url):
                raise SystemExit(f"Redis unreachable at {args.redis_url}: {why}")
            env["AICHAT_REDIS_URL"] = args.redis_url
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.clear()
        os.environ.update(env)
        sys.path.insert(0, str(b.ROOT / "functions" / "chat"))
        # The service logs JSON lines to stderr; keep them out of the report.
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        app_module = importlib.import_module("app")
        app = app_module.app
        for handler in __import__("logging").getLogger("aichat").handlers:
            handler.setStream(io.StringIO())  # the handler captured the real stderr at import

        from werkzeug.test import EnvironBuilder

        auth = user.auth | {"X-Forwarded-For": "198.18.0.1"}
        if args.endpoint == "roles":
            environ, body = EnvironBuilder(path="/chat/roles", method="GET").get_environ(), b""
        elif args.endpoint == "history":
            environ = EnvironBuilder(
                path="/chat/history", query_string=f"role_code={b.ROLE}", headers=auth
            ).get_environ()
            body = b""
        else:
            body = json.dumps({"role_code": b.ROLE, "message": "你好呀"}).encode()
            environ = EnvironBuilder(
                path="/chat/stream", method="POST", headers=auth, content_type="application/json", data=body
            ).get_environ()
        pieces = b.chunks(args.frames)

        def once() -> None:
            if args.endpoint == "stream":
                fake.script(chunks=pieces, delay=0)
            status, data = call(app, environ, body)
            if not status.startswith("200"):
                raise SystemExit(f"{args.endpoint}: {status} {data[:300]!r}")

        for _ in range(5):
            once()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(args.requests):
            once()
        plain = (time.perf_counter() - started) / args.requests
        cpu = (time.process_time() - cpu_started) / args.requests
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.requests):
            once()
        profiler.disable()

    for sort, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(sort).print_stats(args.top)
        text = out.getvalue().replace(str(b.ROOT) + "/", "").replace(sys.prefix + "/", "")
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
        print(f"== profile_app {args.endpoint} ({db.label}): top {args.top} by {title}, {args.requests} requests ==")
        print("\n".join(line.rstrip() for line in lines[start:] if line.strip()))
        print()
    where = f"{db.label}{' with Redis' if args.redis_url else ''}"
    b.note(
        f"{args.endpoint} on {where}: {plain * 1000:.3f} ms per request in-process without profiling,"
        f" {cpu * 1000:.3f} ms of this process's CPU (the fake upstream is another process)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
