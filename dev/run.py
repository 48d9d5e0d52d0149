"""`make run`: serve both services on loopback with the embedded defaults (a dev tool, never shipped)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dev.fake_tools import FakeTools

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "layers" / "common" / "python"


def local_environment(data_dir: Path) -> dict[str, str]:
    """The environment the local services run with: the caller's overrides on top of local defaults."""
    env = dict(os.environ)
    env.setdefault("AICHAT_ENV", "local")
    env.setdefault("AICHAT_SMS_PROVIDER", "console")
    env.setdefault("AICHAT_DB_URL", f"sqlite:///{data_dir / 'aichat.db'}")
    env.setdefault("AICHAT_ROLES_FILE", str(ROOT / "template" / "roles.json"))
    env.setdefault("AICHAT_AUDIO_DIR", str(data_dir / "audio"))
    if not env.get("AICHAT_JWT_SECRET"):
        # Both services must share one secret, and tokens should survive a restart: persist it.
        secret_file = data_dir / "jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(48))
            secret_file.chmod(0o600)
        env["AICHAT_JWT_SECRET"] = secret_file.read_text().strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LAYER), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def serve(function: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    """Start one FC function's app under gunicorn exactly as FC's start command does, on loopback."""
    from dev.launch import function_dir, gunicorn

    return gunicorn(function_dir(function), port=port, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Block until a service answers its URL, or fail if it exits or stays silent."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with code {proc.returncode}; see the log above")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout_s:.0f} s")


def start_tool_fakes(env: dict[str, str]) -> FakeTools | None:
    """Loopback fakes for the tool providers whose settings the caller did not give (weather without a
    key; the hot boards without a base URL: a local run does not scrape the real sites by default)."""
    fake_weather = not (env.get("AICHAT_AMAP_KEY") or env.get("AICHAT_QWEATHER_KEY"))
    fake_news = not (env.get("AICHAT_BAIDU_BASE_URL") or env.get("AICHAT_TOUTIAO_BASE_URL"))
    if not (fake_weather or fake_news):
        return None
    from dev.fake_tools import FakeTools

    providers = FakeTools().start()
    for name, value in providers.env().items():
        weather_var = name.startswith(("AICHAT_AMAP", "AICHAT_QWEATHER"))
        if (weather_var and fake_weather) or (not weather_var and fake_news):
            env[name] = value
    if fake_weather:
        env["AICHAT_WEATHER_PROVIDER"] = "amap"
    print(f"Tool providers without settings (weather, hot news) answer from local fakes at {providers.base_url}")
    return providers


def main() -> int:
    """Migrate, then run LoginService, ChatService and (without an LLM key) the local fake upstream."""
    data_dir = Path(os.environ.get("AICHAT_DATA_DIR", ROOT / "data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = local_environment(data_dir)
    login_port = int(env.get("AICHAT_LOGIN_PORT", "9000"))
    chat_port = int(env.get("AICHAT_CHAT_PORT", "9001"))
    web_port = int(env.get("AICHAT_WEB_PORT", "8080"))

    subprocess.run([sys.executable, "-m", "aichat.manage", "migrate"], env=env, check=True)
    procs: list[subprocess.Popen] = []
    fake = web = providers = tts = None
    has_chat = (ROOT / "functions" / "chat" / "app.py").exists()
    try:
        if has_chat and not (env.get("AICHAT_LLM_API_KEY") or env.get("DASHSCOPE_API_KEY")):
            from dev.fake_llm import FakeLLM

            fake = FakeLLM().start()
            env["AICHAT_LLM_BASE_URL"] = fake.base_url
            env["AICHAT_LLM_API_KEY"] = "local-fake-key"
            print(f"No LLM key set: replies come from the local stand-in model at {fake.base_url}")
            from dev.fake_tts import FakeTts

            tts = FakeTts().start()
            env["AICHAT_DASHSCOPE_BASE_URL"] = tts.base_url
            print(f"... and voice from a local stand-in TTS (a tone per character) at {tts.base_url}")
        providers = start_tool_fakes(env) if has_chat else None
        procs.append(serve("login", login_port, env))
        wait_ready(f"http://127.0.0.1:{login_port}/health", procs[-1])
        if has_chat:
            procs.append(serve("chat", chat_port, env))
            wait_ready(f"http://127.0.0.1:{chat_port}/chat/roles", procs[-1])
        from dev.webserver import WebServer

        web = WebServer(
            login_base_url=f"http://127.0.0.1:{login_port}",
            chat_base_url=f"http://127.0.0.1:{chat_port}",
            port=web_port,
        ).start()
        print(f"LoginService  http://127.0.0.1:{login_port}   (test account 10086 / code 1234)")
        if has_chat:
            print(f"ChatService   http://127.0.0.1:{chat_port}")
        print(f"Web client    {web.url}   <- open this in a browser")
        print(f"Data in {data_dir}. Ctrl-C stops everything.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if fake is not None:
            fake.stop()
        if providers is not None:
            providers.stop()
        if tts is not None:
            tts.stop()
        if web is not None:
            web.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
