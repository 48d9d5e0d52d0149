"""Shared helpers of the benchmark scripts: throwaway databases, users and tokens, the fake upstream as a
subprocess, ChatService under gunicorn, a timing SSE client, /proc memory readings, statistics and tables.

Everything talks to loopback only. The scripts import this module as a sibling (`import benchlib`), and it
puts the repository root and the shared layer on sys.path so tests.servers and aichat import as usual.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "layers" / "common" / "python"
for _path in (str(LAYER), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from aichat.store import Database  # noqa: E402
from aichat.tokens import issue_token  # noqa: E402

from dev.launch import gunicorn  # noqa: E402
from tests.helpers import TEST_SECRET, ServerProcess, base_env, free_port  # noqa: E402

# The layer the measured services run with: the tree's own, or a patched copy to A/B a suggested fix
# (AICHAT_BENCH_LAYER=/path/to/python); the bench process itself always imports the tree's layer.
SERVICE_LAYER = Path(os.environ.get("AICHAT_BENCH_LAYER") or LAYER).resolve()
ROLES_FILE = str(ROOT / "template" / "roles.json")
ROLE = "naitang"
DEFAULT_MYSQL_URL = os.environ.get("AICHAT_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306")
MESSAGE_COLUMNS = "uid, role_code, sender_role, content, has_image, is_partial, created_at"

__all__ = ["LAYER", "ROOT", "TEST_SECRET", "ServerProcess", "base_env", "free_port"]


# -- statistics and output ---------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return pct(values, 50)


def ms(seconds: float, digits: int = 2) -> str:
    """Seconds as a millisecond string."""
    if seconds != seconds:  # NaN
        return "n/a"
    return f"{seconds * 1000:.{digits}f} ms"


def mib(kib: float) -> str:
    """KiB as a MiB string."""
    return f"{kib / 1024:.2f} MiB"


def verdict(value: float, limit: float, *, higher_is_better: bool = False) -> str:
    """'met' or 'MISSED' for a figure against its target."""
    if value != value:
        return "n/a"
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "MISSED"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with a title line."""
    body = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [f"== {title} ==", line(headers), rule, *(line(row) for row in body)]
    return "\n".join(out)


def show(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a table followed by a blank line."""
    print(table(title, headers, rows), flush=True)
    print(flush=True)


def note(text: str) -> None:
    """A progress line (stderr would interleave badly with run_all, so stdout, flushed)."""
    print(f"-- {text}", flush=True)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 5) -> None:
    """Signal a child process and wait for it, killing it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- databases ----------------------------------------------------------------------------------------------
@dataclass
class User:
    """A user row and a token signed with the services' test secret."""

    uid: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        """The Authorization header of this user."""
        return {"Authorization": f"Bearer {self.token}"}


class BenchDB:
    """A throwaway, migrated database: a SQLite file in a temp dir, or a fresh MariaDB database (dropped on close)."""

    def __init__(self, kind: str, tmpdir: Path, mysql_url: str = DEFAULT_MYSQL_URL) -> None:
        self.kind = kind
        self._admin: Any = None
        self.name = ""
        if kind == "sqlite":
            self.path = tmpdir / "bench.db"
            self.url = f"sqlite:///{self.path}"
        else:
            import pymysql

            parts = urlsplit(mysql_url)
            self._parts = parts
            self.name = f"aichat_bench_{secrets.token_hex(4)}"
            self._admin = pymysql.connect(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 3306,
                user=parts.username or "root",
                password=parts.password or "",
                connect_timeout=5,
                autocommit=True,
            )
            with self._admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
            self.url = urlunsplit((parts.scheme, parts.netloc, f"/{self.name}", "", ""))
        db = Database(self.url, auto_migrate=False)
        db.migrate()
        db.close()
        self._conn: Any = None

    @property
    def label(self) -> str:
        """SQLite or MariaDB, for tables."""
        return "SQLite" if self.kind == "sqlite" else "MariaDB"

    def conn(self) -> Any:
        """The bench's own connection (autocommit; explicit transactions for bulk work)."""
        if self._conn is None:
            if self.kind == "sqlite":
                self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
            else:
                import pymysql

                p = self._parts
                self._conn = pymysql.connect(
                    host=p.hostname or "127.0.0.1",
                    port=p.port or 3306,
                    user=p.username or "root",
                    password=p.password or "",
                    database=self.name,
                    charset="utf8mb4",
                    autocommit=True,
                    connect_timeout=5,
                    read_timeout=600,
                    write_timeout=600,
                )
        return self._conn

    def sql(self, text: str) -> str:
        """`?` placeholders for SQLite, `%s` for MySQL."""
        return text if self.kind == "sqlite" else text.replace("?", "%s")

    def query(self, text: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run a query and return all rows."""
        cur = self.conn().cursor()
        try:
            cur.execute(self.sql(text), tuple(params))
            return list(cur.fetchall())
        finally:
            cur.close()

    def bulk_insert(self, text: str, rows: Iterable[Sequence[Any]], batch: int = 20_000) -> int:
        """executemany in batches, one transaction per batch (PyMySQL turns each into multi-row INSERTs)."""
        conn = self.conn()
        total = 0
        chunk: list[Sequence[Any]] = []
        sql = self.sql(text)

        def flush() -> None:
            cur = conn.cursor()
            try:
                if self.kind == "sqlite":
                    cur.execute("BEGIN")
                    cur.executemany(sql, chunk)
                    cur.execute("COMMIT")
                else:
                    conn.begin()
                    cur.executemany(sql, chunk)
                    conn.commit()
            finally:
                cur.close()

        for row in rows:
            chunk.append(row)
            if len(chunk) >= batch:
                flush()
                total += len(chunk)
                chunk = []
        if chunk:
            flush()
            total += len(chunk)
        return total

    def create_users(self, n: int) -> list[User]:
        """n users inserted directly (as LoginService would on first login), each with a signed token."""
        now = int(time.time() * 1000)
        base = secrets.randbelow(10**6)
        uids = [secrets.token_hex(12) for _ in range(n)]
        self.bulk_insert(
            "INSERT INTO users (uid, country_code, phone_number, created_at) VALUES (?, ?, ?, ?)",
            ((uid, "86", f"17{base:06d}{i:05d}"[:15], now) for i, uid in enumerate(uids)),
        )
        return [User(uid, issue_token(uid, secret=TEST_SECRET, ttl_s=86_400)) for uid in uids]

    def insert_messages(self, rows: Iterable[Sequence[Any]], batch: int = 20_000) -> int:
        """Bulk-insert message rows (uid, role_code, sender_role, content, has_image, is_partial, created_at)."""
        return self.bulk_insert(
            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows, batch=batch
        )

    def close(self) -> None:
        """Close connections and drop the MariaDB database."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._admin is not None:
            with self._admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
            self._admin.close()
            self._admin = None


def mysql_available(url: str = DEFAULT_MYSQL_URL) -> str | None:
    """None if MariaDB answers at url, else the reason it does not."""
    import pymysql

    parts = urlsplit(url)
    try:
        conn = pymysql.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=parts.username or "root",
            password=parts.password or "",
            connect_timeout=3,
        )
    except pymysql.MySQLError as exc:
        return str(exc)
    conn.close()
    return None


# -- processes ----------------------------------------------------------------------------------------------
class FakeUpstream:
    """dev/fake_llm.py as its own process (its own GIL: it must not compete with the measuring client)."""

    def __init__(self, delay: float = 0.03) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "dev" / "fake_llm.py"), "--port", "0", "--delay", str(delay)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("fake-llm listening on "):
            self.proc.kill()
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.base_url = line.rsplit(" ", 1)[-1]
        self.port = int(self.base_url.rsplit(":", 1)[-1])
        self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def _post(self, path: str, body: Any) -> None:
        data = json.dumps(body).encode()
        try:
            self._conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            res = self._conn.getresponse()
        except (OSError, http.client.HTTPException):
            self._conn.close()  # the keep-alive connection was dropped: retry once on a new one
            self._conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            res = self._conn.getresponse()
        payload = res.read()
        if res.status != 200:
            raise RuntimeError(f"fake upstream {path}: {res.status} {payload[:200]!r}")

    def script(self, count: int = 1, **script: Any) -> None:
        """Queue `count` copies of a script (FIFO: each chat request takes the next one)."""
        for _ in range(count):
            self._post("/_script", script)

    def reset(self) -> None:
        """Drop queued scripts and recorded requests."""
        self._post("/_reset", {})

    def stop(self) -> None:
        """Stop the process."""
        self._conn.close()
        stop_process(self.proc, signal.SIGTERM)
        if self.proc.stdout:
            self.proc.stdout.close()


def chat_env(db_url: str, llm_url: str, **overrides: Any) -> dict[str, str]:
    """A ChatService environment relaying to the fake upstream (tests.servers.base_env underneath)."""
    settings: dict[str, Any] = {
        "AICHAT_DB_URL": db_url,
        "AICHAT_LLM_BASE_URL": llm_url,
        "AICHAT_LLM_API_KEY": "bench-llm-key",
        "AICHAT_ROLES_FILE": ROLES_FILE,
        "AICHAT_LLM_READ_TIMEOUT": "30",
    }
    return service_env(**{**settings, **overrides})


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


def redis_available(url: str = DEFAULT_REDIS_URL) -> str | None:
    """None when Redis answers at `url` (its database is emptied for the run), else why not."""
    try:
        import redis
    except ImportError as exc:
        return str(exc)
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        return str(exc)
    finally:
        client.close()
    return None


def service_env(**overrides: Any) -> dict[str, str]:
    """tests.servers.base_env, with PYTHONPATH pointing at SERVICE_LAYER."""
    return base_env(PYTHONPATH=str(SERVICE_LAYER), **overrides)


def start_chat(env: dict[str, str], log_dir: Path) -> ServerProcess:
    """ChatService under gunicorn (FC's start command) on a free loopback port, ready to serve."""
    return ServerProcess("chat", env, log_dir).wait_ready("/chat/roles", timeout_s=30)


BARE_FLASK_APP = '''"""A bare Flask app: the reference the services' cold start and throughput are compared with."""
import json
import pathlib

from flask import Flask, jsonify

app = Flask(__name__)
# A control: a document of another endpoint's size, serialised on every request (bench/throughput.py).
_body = pathlib.Path(__file__).with_name("body.json")
BODY = json.loads(_body.read_text()) if _body.exists() else {}


@app.get("/")
def index():
    return jsonify(success=True, message="ok")


@app.get("/body")
def body():
    return jsonify(BODY)
'''


class BareFlask:
    """A bare Flask JSON endpoint (GET /) under the services' gunicorn config, in its own temp dir."""

    def __init__(self, env: dict[str, str], tmp: Path, body: bytes | None = None) -> None:
        self.dir = tmp / "bare_flask"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "app.py").write_text(BARE_FLASK_APP)
        if body is not None:  # served at GET /body
            (self.dir / "body.json").write_bytes(body)
        self.port = free_port()
        self.log_path = self.dir / "gunicorn.log"
        self._log = self.log_path.open("wb")
        self.proc = gunicorn(self.dir, port=self.port, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bare Flask exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if http_get(self.port, "/", timeout=2)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("bare Flask did not answer within 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Quick shutdown."""
        stop_process(self.proc, signal.SIGINT)
        self._log.close()


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- /proc --------------------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, Threads, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def children(pid: int) -> list[int]:
    """Direct children of a process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
        return found


def gunicorn_worker(server: ServerProcess) -> int:
    """The pid of the (single) gunicorn worker: the master's child."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = children(server.proc.pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise RuntimeError("no gunicorn worker process found")


def local_pid(name: str) -> int | None:
    """The oldest process of that name on this machine (a local MariaDB, say), or None."""
    found = subprocess.run(["pgrep", "-o", "-x", name], capture_output=True, text=True, check=False).stdout.split()
    return int(found[0]) if found else None


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def log_problems(log_text: str, limit: int = 8) -> list[tuple[str, int]]:
    """The most common WARNING/ERROR lines of a service's JSON log: (message + error detail, count)."""
    from collections import Counter

    seen: Counter[str] = Counter()
    for line in log_text.splitlines():
        if '"level": "ERROR"' not in line and '"level": "WARNING"' not in line and "Traceback" not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            seen[line.strip()[:110]] += 1
            continue
        detail = record.get("detail") or record.get("error") or record.get("reason") or ""
        seen[f"{record.get('level')}: {record.get('message')} {str(detail)[:80]}".strip()] += 1
    return seen.most_common(limit)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user or root); False if not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


# -- the SSE client -----------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """One streamed request as the client saw it; times are time.time() (the clock x_sent_at uses)."""

    sent_at: float = 0.0
    status: int = 0
    error: str | None = None
    frames: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, payload) of each data: line
    ended_at: float = 0.0

    @property
    def ttff(self) -> float:
        """Seconds from sending the request to the first data frame (NaN if none)."""
        return self.frames[0][0] - self.sent_at if self.frames else float("nan")

    def payloads(self) -> list[dict[str, Any]]:
        """The JSON frames (everything but [DONE])."""
        return [json.loads(p) for _, p in self.frames if p != b"[DONE]"]

    def latencies(self) -> list[float]:
        """Per JSON frame: arrival minus the upstream's x_sent_at (frames without it are skipped)."""
        out = []
        for arrival, payload in self.frames:
            if payload == b"[DONE]":
                continue
            sent = json.loads(payload).get("x_sent_at")
            if isinstance(sent, (int, float)):
                out.append(arrival - sent)
        return out

    def text(self) -> str:
        """The reply text (concatenated delta.content)."""
        return "".join(
            (c.get("delta") or {}).get("content") or "" for f in self.payloads() for c in f.get("choices") or ()
        )

    def problem(self, min_frames: int | None = None, expected_text: str | None = None) -> str | None:
        """Why this stream is not a clean, complete reply (None if it is)."""
        if self.error:
            return self.error
        if not self.frames or self.frames[-1][1] != b"[DONE]":
            return "no [DONE]"
        frames = self.payloads()
        if any(f.get("error") for f in frames):
            return "fallback frame: " + str(next(f["error"] for f in frames if f.get("error")))
        if min_frames is not None and len(frames) < min_frames:
            return f"{len(frames)} frames, expected at least {min_frames}"
        if expected_text is not None and self.text() != expected_text:
            return "reply text differs"
        return None


def sse_post(
    port: int, path: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 60
) -> StreamResult:
    """POST a JSON body and read the SSE response, timestamping each frame the moment its bytes arrive."""
    data = json.dumps(body, ensure_ascii=False).encode()
    hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **(headers or {})}
    res = StreamResult()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        res.sent_at = time.time()
        conn.request("POST", path, body=data, headers=hdrs)
        resp = conn.getresponse()
        res.status = resp.status
        if resp.status != 200:
            res.error = f"HTTP {resp.status} {resp.read()[:160].decode(errors='replace')}"
            return res
        buffer = b""
        while True:
            chunk = resp.read1(65536)
            now = time.time()
            if not chunk:
                break
            buffer += chunk
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                event, buffer = buffer[:end], buffer[end + 2 :]
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        res.frames.append((now, line[5:].strip()))
    except (OSError, http.client.HTTPException) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        res.ended_at = time.time()
        conn.close()
    return res


def http_get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """A plain GET: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def chunks(n: int, tag: str = "") -> list[str]:
    """n distinct reply pieces (mixed Chinese and ASCII, like a tokenizer's output)."""
    return [f"片段{tag}{i:03d} " for i in range(n)]


def upstream_request(text: str = "你好") -> dict[str, Any]:
    """The body a client sends straight to the upstream (what the relay sends, minus the history)."""
    return {
        "model": "qwen-plus",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": text}],
    }
