"""The one way an FC function's app is started off FC: gunicorn with the layer's config, as FC's start command.

Used by `make run` (dev/run.py), the tests (tests/helpers.py) and the benchmarks (bench/); never shipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
# s.yaml's customRuntimeConfig.command runs exactly this in the function's code directory.
GUNICORN_ARGS = ("-m", "gunicorn", "-c", "python:aichat.gunicorn_conf", "app:app")


def gunicorn(app_dir: Path | str, *, port: int, env: dict[str, str], **popen: Any) -> subprocess.Popen:
    """Start gunicorn serving `app_dir`/app.py on 127.0.0.1:`port` (a function folder, or a bench's bare app)."""
    return subprocess.Popen(
        [sys.executable, *GUNICORN_ARGS],
        cwd=app_dir,
        env={**env, "AICHAT_BIND": f"127.0.0.1:{port}"},
        **popen,
    )


def function_dir(function: str) -> Path:
    """The code directory of one FC function (login or chat)."""
    return FUNCTIONS / function
