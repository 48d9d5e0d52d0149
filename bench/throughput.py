"""Requests/s of GET /chat/roles and GET /chat/history (50 stored messages, MariaDB) on one ChatService
instance, without and with Redis (AICHAT_REDIS_URL: token liveness cached there), against a bare Flask JSON
endpoint under the same gunicorn config (AICHAT_THREADS=32, the
production default, unless --threads), measured in the same run with wrk (keep-alive; 1 wrk thread so
the server keeps a core).

Rounds are interleaved (bare, roles, history, rotating), the figure is each endpoint's median over rounds.
Without wrk, a Python keep-alive load generator is used instead (its own overhead caps the figures).

    .venv/bin/python bench/throughput.py [--duration 3] [--rounds 5] [--connections 16] [--sqlite]
        [--redis-url redis://127.0.0.1:6379/14 | --no-redis] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import shutil
import subprocess
import threading
import time

import benchlib as b

TARGETS = {"GET /chat/roles": 0.80, "GET /chat/history": 0.40}
COLUMNS = ["endpoint", "body", "req/s", "rounds", "vs bare", "target", "verdict", "p50", "p99"]
COLUMNS += ["worker CPU/req", "MariaDB CPU/req", "errors"]
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(binary: str, port: int, path: str, headers: dict[str, str], conns: int, duration: float) -> dict[str, float]:
    """One wrk run: requests/s, non-2xx count, socket errors, p50/p99 latency (s)."""
    cmd = [binary, "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency"]
    for key, value in headers.items():
        cmd += ["-H", f"{key}: {value}"]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=duration + 60
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = {q: re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M) for q in ("50", "99")}
    return {
        "rps": float(rps.group(1)),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "sockerr": float(sum(int(g) for g in sock.groups())) if sock else 0.0,
        **{f"p{q}": float(m.group(1)) * UNITS[m.group(2)] if m else float("nan") for q, m in lat.items()},
    }


def pyload(port: int, path: str, headers: dict[str, str], conns: int, duration: float) -> dict[str, float]:
    """The fallback load generator: `conns` threads, each one keep-alive connection, for `duration` s."""
    stop = time.perf_counter() + duration
    lats: list[float] = []
    bad = [0]
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                res = conn.getresponse()
                res.read()
                ok = res.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                ok = False
            mine.append(time.perf_counter() - t0)
            if not ok:
                with lock:
                    bad[0] += 1
        conn.close()
        with lock:
            lats.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 60)
    return {
        "rps": len(lats) / duration,
        "non2xx": float(bad[0]),
        "sockerr": 0.0,
        "p50": b.pct(lats, 50),
        "p99": b.pct(lats, 99),
    }


def main() -> int:
    """Measure and print the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of MariaDB")
    parser.add_argument("--mysql-url", default=b.DEFAULT_MYSQL_URL)
    parser.add_argument("--messages", type=int, default=50, help="stored messages for /chat/history (50)")
    parser.add_argument("--threads", type=int, default=32, help="AICHAT_THREADS of both servers (default 32)")
    parser.add_argument(
        "--log-level", default=None, help="AICHAT_LOG_LEVEL of the service (default: its own, INFO = access log on)"
    )
    parser.add_argument("--redis-url", default=b.DEFAULT_REDIS_URL, help="Redis for the second instance (emptied)")
    parser.add_argument("--no-redis", action="store_true", help="only the instance without Redis")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = min(args.duration, 2), 1

    kind = "sqlite" if args.sqlite else "mysql"
    if kind == "mysql" and (why := b.mysql_available(args.mysql_url)):
        b.note(f"MariaDB unreachable ({why}); measuring on SQLite instead")
        kind = "sqlite"
    binary = shutil.which("wrk")
    tool = "wrk" if binary else "Python load generator (wrk not installed: apt-get install wrk)"

    def run(port: int, path: str, headers: dict[str, str], duration: float) -> dict[str, float]:
        if binary:
            return wrk(binary, port, path, headers, args.connections, duration)
        return pyload(port, path, headers, args.connections, duration)

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(b.temp_dir("aichat-bench-rps-"))
        db = b.BenchDB(kind, tmp, args.mysql_url)
        stack.callback(db.close)
        user = db.create_users(1)[0]
        now = int(time.time() * 1000) - 3_600_000
        db.insert_messages(
            (
                user.uid,
                b.ROLE,
                "user" if i % 2 == 0 else "assistant",
                f"第{i}条消息：今天天气不错，想出去走走。",
                0,
                0,
                now + i,
            )
            for i in range(args.messages)
        )
        env = b.chat_env(db.url, "http://127.0.0.1:9", AICHAT_THREADS=args.threads, AICHAT_LOG_LEVEL=args.log_level)
        chat = b.start_chat(env, tmp)
        stack.callback(chat.stop)
        redis_chat = None
        if not args.no_redis:
            if why := b.redis_available(args.redis_url):
                b.note(f"Redis unreachable at {args.redis_url} ({why}); measuring without it only")
            else:
                redis_chat = b.start_chat({**env, "AICHAT_REDIS_URL": args.redis_url}, tmp)
                stack.callback(redis_chat.stop)
        # The bare app also serves /chat/roles' own document at /body: a control for the body's size.
        roles_body = b.http_get(chat.port, "/chat/roles")[1]
        bare = b.BareFlask(b.service_env(AICHAT_THREADS=args.threads), tmp, body=roles_body)
        stack.callback(bare.stop)

        endpoints = {
            "bare Flask GET /": (bare.port, "/", {}),
            "bare Flask, roles' body": (bare.port, "/body", {}),
            "GET /chat/roles": (chat.port, "/chat/roles", {}),
            "GET /chat/history": (chat.port, f"/chat/history?role_code={b.ROLE}", user.auth),
        }
        if redis_chat is not None:
            endpoints["GET /chat/roles, Redis"] = (redis_chat.port, "/chat/roles", {})
            endpoints["GET /chat/history, Redis"] = (redis_chat.port, f"/chat/history?role_code={b.ROLE}", user.auth)
        # Check the answers once, then warm each endpoint up.
        status, body = b.http_get(chat.port, endpoints["GET /chat/history"][1], user.auth)
        count = len(json.loads(body).get("messages", [])) if status == 200 else -1
        if count != args.messages:
            raise SystemExit(f"/chat/history answered {status} with {count} messages, expected {args.messages}")
        sizes = {}
        for name, (port, path, headers) in endpoints.items():
            status, body = b.http_get(port, path, headers)
            if status != 200:
                raise SystemExit(f"{name} answered {status}: {body[:200]!r}")
            sizes[name] = len(body)
            run(port, path, headers, 1)
        b.note(f"{tool}: {args.rounds} rounds x {len(endpoints)} endpoints x {args.duration:g} s, {db.label}")

        # CPU per request of the serving worker and of the local MariaDB server (what Redis takes off it).
        workers = {bare.port: b.children(bare.proc.pid)[0], chat.port: b.gunicorn_worker(chat)}
        if redis_chat is not None:
            workers[redis_chat.port] = b.gunicorn_worker(redis_chat)
        mariadb = b.local_pid("mariadbd") if kind == "mysql" else None

        def cpu(pid: int | None) -> float:
            return sum(b.cpu_seconds(pid)) if pid else float("nan")

        results: dict[str, list[dict[str, float]]] = {name: [] for name in endpoints}
        names = list(endpoints)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                port, path, headers = endpoints[name]
                before = cpu(workers[port]), cpu(mariadb)
                result = run(port, path, headers, args.duration)
                served = max(1.0, result["rps"] * args.duration)
                result["worker_ms"] = (cpu(workers[port]) - before[0]) / served * 1000
                result["db_ms"] = (cpu(mariadb) - before[1]) / served * 1000
                results[name].append(result)
        log_problems = b.log_problems(chat.log() + (redis_chat.log() if redis_chat else ""))

    base = b.median([r["rps"] for r in results["bare Flask GET /"]])
    rows = []
    for name in names:
        runs = results[name]
        rps = b.median([r["rps"] for r in runs])
        target = TARGETS.get(name.split(",")[0])
        rows.append(
            [
                name,
                f"{sizes[name]} B",
                f"{rps:.0f}",
                " / ".join(f"{r['rps']:.0f}" for r in runs),
                f"{rps / base:.0%}",
                f">= {target:.0%}" if target else "",
                b.verdict(round(rps / base, 2), target, higher_is_better=True) if target else "",
                b.ms(b.median([r["p50"] for r in runs])),
                b.ms(b.median([r["p99"] for r in runs])),
                f"{b.median([r['worker_ms'] for r in runs]):.2f} ms",
                f"{b.median([r['db_ms'] for r in runs]):.2f} ms" if mariadb else "",
                int(sum(r["non2xx"] + r["sockerr"] for r in runs)),
            ]
        )
    b.show(
        f"throughput: one gunicorn instance (gthread, {args.threads} threads),"
        f" {args.connections} keep-alive connections, {db.label}, {tool}",
        COLUMNS,
        rows,
    )
    if log_problems:
        b.show("throughput: warnings and errors in the service log", ["log line", "count"], log_problems)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
