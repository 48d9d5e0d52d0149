"""Cold start of each service: import time of its entry module and time from process start to the first
served request under gunicorn, each against a bare Flask app under the same settings, medians of reps.

Import time: `python -X importtime -c "import app"` with cwd functions/<name>, PYTHONPATH=the layer and a
minimal environment (production-like: Dysmsapi configured for login, an LLM key for chat; SQLite). The
figure is the `app` line's cumulative time. Start to first request: `python -m gunicorn -c
python:aichat.gunicorn_conf app:app`, from Popen until the first response to a real request (login
/health; chat /chat/roles on an already migrated database; bare Flask /) has been read; the client
connects as soon as gunicorn listens, so the request is served the moment the worker is up.

    .venv/bin/python bench/coldstart.py [--reps 7] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import benchlib as b

from dev.launch import gunicorn

TARGET_RATIO = 1.5
SDK_PREFIXES = ("alibabacloud", "Tea", "darabonba")
WATCHED = (*SDK_PREFIXES, "pymysql", "requests", "urllib3", "cryptography", "jinja2")


def minimal_env(tmp: Path) -> dict[str, str]:
    """What FC would give the function, and nothing from the caller's shell."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(b.SERVICE_LAYER),
        "AICHAT_ENV": "test",
        "AICHAT_JWT_SECRET": b.TEST_SECRET,
        "AICHAT_DB_URL": f"sqlite:///{tmp / 'cold.db'}",
        "AICHAT_ROLES_FILE": b.ROLES_FILE,
        "AICHAT_LLM_API_KEY": "bench-llm-key",
        "AICHAT_LLM_BASE_URL": "http://127.0.0.1:9",
        "AICHAT_SMS_PROVIDER": "dysms",
        "AICHAT_SMS_ENDPOINT": "http://127.0.0.1:9",
        "AICHAT_SMS_SIGN_NAME": "bench",
        "AICHAT_SMS_TEMPLATE_CODE": "SMS_000000001",
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "bench-key-id",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "bench-key-secret",
        "AICHAT_LOG_LEVEL": "WARNING",
    }


def import_times(cwd: Path, env: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """module -> (self us, cumulative us, depth) from one `-X importtime` run."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import app"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"import app failed in {cwd}:\n{proc.stderr[-2000:]}")
    out: dict[str, tuple[int, int, int]] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line.split(":", 1)[1].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        out[name.strip()] = (int(self_us), int(cum_us), depth)
    return out


def wall_import(cwd: Path, env: dict[str, str]) -> float:
    """Seconds for a whole `python -c "import app"` process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import app"], cwd=cwd, env=env, check=True, timeout=60)
    return time.perf_counter() - started


def loaded_modules(cwd: Path, env: dict[str, str]) -> dict[str, int]:
    """How many modules of each watched package sys.modules holds after `import app`."""
    code = (
        "import app, sys, json; print(json.dumps({p: sum(1 for m in sys.modules if m == p or m.startswith(p + '.'))"
        f" for p in {WATCHED!r}}}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_to_first_request(cwd: Path, env: dict[str, str], path: str) -> float:
    """Seconds from starting gunicorn to reading the first response to `path`."""
    port = b.free_port()
    started = time.perf_counter()
    proc = gunicorn(cwd, port=port, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = started + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited {proc.returncode} in {cwd}: {proc.stderr.read()[-2000:]!r}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"gunicorn in {cwd} did not answer within 30 s")
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            except OSError:
                time.sleep(0.002)
                continue
            with sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(65536):
                        data += chunk
            elapsed = time.perf_counter() - started
            if data.startswith(b"HTTP/1.1 200"):
                return elapsed
            if data:
                raise RuntimeError(f"{path} in {cwd} answered {data[:200]!r}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def main() -> int:
    """Measure and print the cold-start tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="repetitions per measurement (default 7)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.reps = min(args.reps, 3)

    with b.temp_dir("aichat-bench-cold-") as tmp:
        bare_dir = tmp / "bare"
        bare_dir.mkdir()
        (bare_dir / "app.py").write_text(b.BARE_FLASK_APP)
        env = minimal_env(tmp)
        apps = {
            "bare Flask": (bare_dir, "/"),
            "login": (b.ROOT / "functions" / "login", "/health"),
            "chat": (b.ROOT / "functions" / "chat", "/chat/roles"),
        }
        # Unmeasured first runs: byte-compile everything and migrate the database + sync the roles once.
        for cwd, path in apps.values():
            wall_import(cwd, env)
            start_to_first_request(cwd, env, path)
        b.note(f"{args.reps} repetitions of 3 measurements x {len(apps)} apps")

        imports: dict[str, list[dict[str, tuple[int, int, int]]]] = {name: [] for name in apps}
        walls: dict[str, list[float]] = {name: [] for name in apps}
        firsts: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(args.reps):
            for name, (cwd, path) in apps.items():  # interleaved: noise hits every app alike
                imports[name].append(import_times(cwd, env))
                walls[name].append(wall_import(cwd, env))
                firsts[name].append(start_to_first_request(cwd, env, path))
        modules = {name: loaded_modules(cwd, env) for name, (cwd, _) in apps.items()}

    def app_import(name: str) -> float:
        return b.median([run["app"][1] / 1e6 for run in imports[name]])

    bare_imp, bare_wall, bare_first = (
        app_import("bare Flask"),
        b.median(walls["bare Flask"]),
        b.median(firsts["bare Flask"]),
    )
    rows = []
    for name in apps:
        imp, wall, first = app_import(name), b.median(walls[name]), b.median(firsts[name])
        is_bare = name == "bare Flask"
        rows.append(
            [
                name,
                b.ms(imp, 1),
                "" if is_bare else f"{imp / bare_imp:.2f}x",
                "" if is_bare else b.verdict(round(imp / bare_imp, 2), TARGET_RATIO),
                b.ms(wall, 1),
                "" if is_bare else f"{wall / bare_wall:.2f}x",
                b.ms(first, 1),
                "" if is_bare else f"{first / bare_first:.2f}x",
                "" if is_bare else b.verdict(round(first / bare_first, 2), TARGET_RATIO),
            ]
        )
    b.show(
        f"coldstart: medians of {args.reps} runs (target <= {TARGET_RATIO}x bare Flask)",
        [
            "app",
            "import app",
            "ratio",
            "verdict",
            "python -c 'import app'",
            "ratio",
            "gunicorn start -> 1st response",
            "ratio",
            "verdict",
        ],
        rows,
    )

    for name in apps:
        if name == "bare Flask":
            continue
        names = set().union(*(run.keys() for run in imports[name])) - {"app"}
        cum = {m: b.median([run[m][1] for run in imports[name] if m in run]) for m in names}
        own = {m: b.median([run[m][0] for run in imports[name] if m in run]) for m in names}
        depth = {m: imports[name][-1].get(m, (0, 0, 0))[2] for m in names}
        top = sorted(names, key=lambda m: -cum[m])[:10]
        b.show(
            f"coldstart: top 10 cumulative imports of {name} (median us; depth 1 = imported by app itself)",
            ["module", "cumulative", "self", "depth"],
            [[m, f"{cum[m] / 1000:.1f} ms", f"{own[m] / 1000:.1f} ms", depth[m]] for m in top],
        )

    rows = []
    for name in apps:
        loaded = modules[name]
        sdk = sum(loaded[p] for p in SDK_PREFIXES)
        rows.append(
            [
                name,
                sdk,
                "0",
                "met" if sdk == 0 else "MISSED",
                ", ".join(f"{p} {loaded[p]}" for p in WATCHED if p not in SDK_PREFIXES and loaded[p]) or "-",
            ]
        )
    b.show(
        "coldstart: modules loaded by `import app` (login configured for Dysmsapi)",
        ["app", "Alibaba SDK modules", "target", "verdict", "other watched packages (module count)"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
