"""Relay overhead of /chat/stream: the same scripted reply read straight from the fake upstream, through
ChatService (SQLite; with --mysql also MariaDB), and through nginx as a reference relay, in one run.

Requests are sequential and interleaved round by round (the order rotates), so machine noise hits every
path alike. Each frame carries the upstream's x_sent_at (time.time() when it was written); per-frame
latency is its arrival minus that, measured the same way on every path. Time to first frame is from
sending the request to the first frame's arrival; "added" is the path's percentile minus the direct one.
The relay's user has 40 stored messages, so every request reads a full history window.

With --redis-url, one more ChatService (on MariaDB with --mysql, else SQLite) keeps its hot path in Redis.
Per-frame target: the added p99 at most 1.5x nginx's added p99 in the same run (and at most 1 ms).

    .venv/bin/python bench/relay.py [--requests 30] [--frames 50] [--interval 0.02] [--mysql]
        [--redis-url redis://127.0.0.1:6379/14] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import benchlib as b

TARGET_FRAME_P99_S = 0.001
TARGET_FRAME_P99_VS_NGINX = 1.5
TARGET_TTFF_S = {"SQLite": 0.010, "MariaDB": 0.015}


class Nginx:
    """nginx (the Debian package) with a config in a temp dir: an unbuffered HTTP/1.1 proxy to one upstream."""

    def __init__(self, binary: str, upstream_port: int, tmp: Path) -> None:
        self.port = b.free_port()
        prefix = tmp / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._error_log = prefix / "error.log"
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.error_log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nginx did not start listening")
            time.sleep(0.02)

    def error_log(self) -> str:
        """nginx's error log so far."""
        try:
            return self._error_log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown."""
        b.stop_process(self.proc, signal.SIGTERM)


def find_nginx() -> str | None:
    """The nginx binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def main() -> int:
    """Measure and print the relay overhead tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="measured requests per path (default 30)")
    parser.add_argument("--frames", type=int, default=50, help="reply pieces per stream (default 50)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between upstream frames (0.02)")
    parser.add_argument("--mysql", action="store_true", help="also relay through a ChatService on MariaDB")
    parser.add_argument("--mysql-url", default=b.DEFAULT_MYSQL_URL)
    parser.add_argument("--redis-url", default="", help="also a ChatService with Redis (emptied first)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference path")
    parser.add_argument("--quick", action="store_true", help="8 requests of 20 frames per path")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.frames = min(args.requests, 8), min(args.frames, 20)

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(b.temp_dir("aichat-bench-relay-"))
        fake = b.FakeUpstream(delay=args.interval)
        stack.callback(fake.stop)
        # path name -> (port, url path, headers, body factory, backend label or None)
        paths: dict[str, tuple[int, str, dict[str, str], str | None]] = {
            "direct (fake upstream)": (fake.port, "/chat/completions", {}, None)
        }
        nginx_note = ""
        if not args.no_nginx:
            binary = find_nginx()
            if binary is None:
                nginx_note = "nginx is not installed (apt-get install nginx): reference row skipped"
            else:
                nginx = Nginx(binary, fake.port, tmp)
                stack.callback(nginx.stop)
                paths["nginx (reference relay)"] = (nginx.port, "/chat/completions", {}, None)
        servers = []
        setups = [("sqlite", ""), ("mysql", "")] if args.mysql else [("sqlite", "")]
        if args.redis_url:
            if why := b.redis_available(args.redis_url):
                raise SystemExit(f"Redis unreachable at {args.redis_url}: {why}")
            setups.append((setups[-1][0], args.redis_url))
        for kind, redis_url in setups:
            sub = tmp / f"{kind}{'-redis' if redis_url else ''}"
            sub.mkdir()
            db = b.BenchDB(kind, sub, args.mysql_url)
            stack.callback(db.close)
            user = db.create_users(1)[0]
            now = int(time.time() * 1000) - 3_600_000
            db.insert_messages(
                (user.uid, b.ROLE, "user" if i % 2 == 0 else "assistant", f"历史消息 {i} " * 5, 0, 0, now + i)
                for i in range(40)
            )
            env = b.chat_env(
                db.url,
                fake.base_url,
                AICHAT_CHAT_MESSAGES_PER_MINUTE=100_000,
                AICHAT_CHAT_MAX_CONCURRENT_STREAMS=100,
                AICHAT_REDIS_URL=redis_url,
            )
            server = b.start_chat(env, sub)
            stack.callback(server.stop)
            servers.append(server)
            label = db.label + (" + Redis" if redis_url else "")
            paths[f"ChatService /chat/stream ({label})"] = (server.port, "/chat/stream", user.auth, db.label)

        pieces = b.chunks(args.frames)
        expected = "".join(pieces)
        names = list(paths)
        ttff: dict[str, list[float]] = {name: [] for name in names}
        first_lat: dict[str, list[float]] = {name: [] for name in names}
        frame_lat: dict[str, list[float]] = {name: [] for name in names}
        errors: dict[str, list[str]] = {name: [] for name in names}
        seconds = len(names) * (args.requests + 2) * args.frames * args.interval
        b.note(f"{len(names)} paths x {args.requests} requests x {args.frames} frames: about {seconds:.0f} s")

        for rnd in range(args.requests + 2):  # two warm-up rounds
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                port, path, headers, backend = paths[name]
                body = b.upstream_request("你好呀") if backend is None else {"role_code": b.ROLE, "message": "你好呀"}
                fake.script(chunks=pieces, delay=args.interval)
                res = b.sse_post(port, path, body, headers)
                problem = res.problem(args.frames + 1, expected)
                if rnd < 2:
                    if problem:
                        raise SystemExit(f"warm-up through {name} failed: {problem}")
                    continue
                if problem:
                    errors[name].append(problem)
                    continue
                lat = res.latencies()
                ttff[name].append(res.ttff)
                first_lat[name].append(lat[0])
                frame_lat[name].extend(lat[1:])
        log_problems = [(f"{s.port}: {line}", n) for s in servers for line, n in b.log_problems(s.log())]

    direct = names[0]
    d50, d99 = b.pct(ttff[direct], 50), b.pct(ttff[direct], 99)
    rows = []
    for name in names:
        backend = paths[name][3]
        p50, p99 = b.pct(ttff[name], 50), b.pct(ttff[name], 99)
        target = TARGET_TTFF_S.get(backend or "")
        rows.append(
            [
                name,
                len(ttff[name]),
                b.ms(p50),
                b.ms(p99),
                "" if name == direct else b.ms(p50 - d50),
                "" if name == direct else b.ms(p99 - d99),
                f"added <= {target * 1000:.0f} ms" if target else "",
                b.verdict(p50 - d50, target) if target else "",
                b.verdict(p99 - d99, target) if target else "",
            ]
        )
    b.show(
        f"relay: time to first frame ({args.requests} requests per path, sequential)",
        ["path", "n", "p50", "p99", "added p50", "added p99", "target", "p50 verdict", "p99 verdict"],
        rows,
    )

    f50, f99 = b.pct(frame_lat[direct], 50), b.pct(frame_lat[direct], 99)
    nginx_added = b.pct(frame_lat[ref], 99) - f99 if (ref := "nginx (reference relay)") in frame_lat else None
    limit = TARGET_FRAME_P99_S
    if nginx_added is not None:
        limit = min(limit, max(nginx_added, 0.0) * TARGET_FRAME_P99_VS_NGINX)
    rows = []
    for name in names:
        backend = paths[name][3]
        p50, p99 = b.pct(frame_lat[name], 50), b.pct(frame_lat[name], 99)
        rows.append(
            [
                name,
                len(frame_lat[name]),
                b.ms(p50, 3),
                b.ms(p99, 3),
                "" if name == direct else b.ms(p50 - f50, 3),
                "" if name == direct else b.ms(p99 - f99, 3),
                b.ms(b.pct(first_lat[name], 50), 3),
                f"added p99 <= {limit * 1000:.2f} ms" if backend else "",
                b.verdict(p99 - f99, limit) if backend else "",
            ]
        )
    b.show(
        f"relay: per-frame latency, arrival - x_sent_at ({args.frames} frames {args.interval * 1000:.0f} ms apart;"
        " frames after the first)",
        ["path", "frames", "p50", "p99", "added p50", "added p99", "1st frame p50", "target", "verdict"],
        rows,
    )
    failed = [(name, len(errs), errs[0]) for name, errs in errors.items() if errs]
    if failed:
        b.show("relay: failed requests", ["path", "count", "first problem"], failed)
    if log_problems:
        b.show("relay: warnings and errors in the service logs", ["log line", "count"], log_problems)
    if nginx_note:
        b.note(nginx_note)
    b.note("'added' = percentile through the path minus the same percentile read directly from the upstream")
    if nginx_added is not None:
        b.note(f"per-frame target: added p99 <= {TARGET_FRAME_P99_VS_NGINX}x nginx's added p99 and <= 1 ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
