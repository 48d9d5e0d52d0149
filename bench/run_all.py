"""Run every benchmark script in turn and print all their tables, then a summary of what missed its target.

    .venv/bin/python bench/run_all.py [--quick] [--mysql] [--only load,relay,...]

--mysql is passed to the scripts that take it (load, relay, scale); throughput uses MariaDB by default.
Exits non-zero only if a script failed to run (a missed target is a finding, not a failure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("load", "relay", "coldstart", "throughput", "scale", "tools", "voice")
TAKES_MYSQL = ("load", "relay", "scale")
TIMEOUT_S = 420


def main() -> int:
    """Run the scripts, echoing their output, and summarise."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--mysql", action="store_true", help="pass --mysql to load, relay and scale")
    parser.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {','.join(SCRIPTS)}")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        parser.error(f"unknown scripts: {', '.join(unknown)}")

    summary = []
    missed: list[str] = []
    for name in chosen:
        cmd = [sys.executable, str(HERE / f"{name}.py")]
        if args.quick:
            cmd.append("--quick")
        if args.mysql and name in TAKES_MYSQL:
            cmd.append("--mysql")
        shown = " ".join(["bench/" + Path(cmd[1]).name, *cmd[2:]])
        print(f"\n##### {shown}\n", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
        assert proc.stdout is not None
        title = ""
        watchdog = threading.Timer(TIMEOUT_S, proc.kill)  # a hung script must not hang `make bench`
        watchdog.start()
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("== "):
                    title = line.strip("= \n")
                elif "MISSED" in line:
                    missed.append(f"{title}: {' '.join(line.split())}")
            rc = proc.wait()
        finally:
            watchdog.cancel()
        summary.append((shown, rc, time.monotonic() - started))

    print("\n== run_all: scripts ==")
    width = max(len(s) for s, _, _ in summary)
    for shown, rc, elapsed in summary:
        print(f"{shown.ljust(width)}  exit {rc}  {elapsed:6.1f} s")
    print("\n== run_all: missed targets ==")
    print("\n".join(missed) if missed else "none")
    return 0 if all(rc == 0 for _, rc, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
