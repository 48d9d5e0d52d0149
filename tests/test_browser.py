"""The web client end to end in Debian's Chromium (Playwright): login, roles, streaming, history, image,
conversations (create, switch, rename, delete, a stream error under its reply), clear; a role's skills and the
tool progress under a reply (the tool providers are loopback fakes); a reply read aloud (the TTS is a loopback
fake); accounts: registration, password login, the access token renewed with the refresh token, the profile
panel (profile, password, sessions, logout everywhere); idempotency keys on every turn (resent with the same key
after a renewed token, a 409 RequestInProgress and a network error) and 继续 (a cut reply continued in place)."""

from __future__ import annotations

import base64
import http.client
import json
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.webserver import WebServer
from tests.conftest import IN_CI, chat_env
from tests.helpers import Client, ServerProcess, history, read_stream

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPENING = "喵呜,我是奶糖,今天也想黏在你身边陪你聊天呀。你想先跟我说说现在的心情,还是让我蹭蹭你再开始?"
CHUNKS = ["喵呜～", "今天", "也要", "开开", "心心", "哦！"]
# Everything outside loopback (the contract's OSS avatar and background) is answered locally: no network.
EXTERNAL = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")


def require(reason: str) -> None:
    """Skip locally, but fail in CI, where the browser suite is required."""
    if IN_CI:
        pytest.fail(f"{reason} (the browser suite is required in CI)")
    pytest.skip(reason)


def png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (240, 160, 190)) -> bytes:
    """A valid solid-colour PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless; never a downloaded browser."""
    if not CHROMIUM.exists():
        require(f"{CHROMIUM} is not installed (apt-get install chromium)")
    if sync_playwright is None:
        require("the playwright package is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def chat_service(
    start_server, sqlite_url, fake_llm_server, fake_tools_server, fake_tts_server, tmp_path_factory
) -> ServerProcess:
    """ChatService on SQLite, its tool providers and its TTS pointed at the fakes (audio kept in a temp dir)."""
    env = chat_env(
        fake_llm_server,
        sqlite_url,
        **fake_tools_server.env(),
        AICHAT_DASHSCOPE_BASE_URL=fake_tts_server.base_url,
        AICHAT_AUDIO_DIR=str(tmp_path_factory.mktemp("browser-audio")),
        AICHAT_TTS_TIMEOUT="5",
    )
    return start_server("chat", **env)


@pytest.fixture(scope="module")
def login_service(start_server, sqlite_url) -> ServerProcess:
    """LoginService on SQLite (the console SMS provider; the test account's code is 1234)."""
    return start_server("login", AICHAT_DB_URL=sqlite_url)


@pytest.fixture(scope="module")
def site(login_service, chat_service) -> Iterator[WebServer]:
    """Both services on SQLite and the web client pointed at them."""
    web = WebServer(login_base_url=login_service.base_url, chat_base_url=chat_service.base_url).start()
    yield web
    web.stop()


def assistant_text(page: Page) -> str:
    """The text of the newest assistant bubble."""
    return page.locator(".bubble.assistant .text").last.inner_text()


def test_chat_flow(browser, site, fake_llm, tmp_path):
    context = browser.new_context(viewport={"width": 420, "height": 820}, locale="zh-CN")
    context.set_default_timeout(10_000)
    context.route(EXTERNAL, lambda route: route.fulfill(status=200, content_type="image/png", body=png()))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    try:
        page.goto(site.url)

        # Login with the prefilled test account, asking for a code first.
        expect(page.locator("#login-view")).to_be_visible()
        expect(page.locator("#phone")).to_have_value("10086")
        expect(page.locator("#country-code")).to_have_value("86")
        expect(page.locator("#code")).to_have_value("1234")
        page.click("#send-code-btn")
        expect(page.locator("#notice")).to_contain_text("测试账号验证码固定为 1234")
        expect(page.locator("#send-code-btn")).to_be_disabled()
        expect(page.locator("#send-code-btn")).to_contain_text("秒后重发")
        page.click("#login-btn")
        expect(page.locator("#roles-view")).to_be_visible()
        expect(page.locator("#user-label")).to_have_text("+86 10086")

        # Pick 奶糖: the opening message comes first; clear leftovers so the run is repeatable.
        card = page.locator('.role-card[data-role="naitang"]')
        expect(card).to_contain_text("奶糖")
        expect(page.locator(".role-card")).to_have_count(4)
        card.click()
        expect(page.locator("#chat-name")).to_have_text("奶糖")
        opening = page.locator(".bubble.assistant.opening")
        expect(opening).to_have_text(OPENING)
        expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")
        if page.locator(".bubble").count() > 1:
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#clear-btn")
            expect(page.locator(".bubble")).to_have_count(1)
        # The default conversation opens first (a placeholder entry until a first message creates it).
        page.click("#conv-btn")
        expect(page.locator("#conv-drawer")).to_be_visible()
        expect(page.locator('.conv-item[data-default="true"] .conv-open')).to_have_attribute("aria-current", "true")
        page.keyboard.press("Escape")
        expect(page.locator("#conv-drawer")).to_be_hidden()

        # A slow reply grows in the bubble as it streams.
        fake_llm.enqueue(chunks=CHUNKS, delay=0.25)
        final = "".join(CHUNKS)
        page.fill("#message", "今天有点累。")
        page.press("#message", "Enter")
        expect(page.locator(".bubble.assistant.streaming")).to_have_count(1)
        expect(page.locator("#send-btn")).to_be_disabled()
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = assistant_text(page)
            if text == final:
                break
            if text and len(text) not in seen:
                seen.append(len(text))
            time.sleep(0.03)
        intermediate = [n for n in seen if 0 < n < len(final)]
        assert len(intermediate) >= 2, f"reply did not stream incrementally: lengths {seen}"
        expect(page.locator(".bubble.assistant .text").last).to_have_text(final)
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        expect(page.locator("#send-btn")).to_be_enabled()
        expect(page.locator("#message")).to_have_value("")

        # A reload keeps the session and the conversation, now read from the history.
        page.reload()
        expect(page.locator("#chat-view")).to_be_visible()
        expect(page.locator(".bubble.user .text")).to_have_text(["今天有点累。"])
        expect(page.locator(".bubble.assistant .text")).to_have_text([OPENING, final])

        # A photo with a message: preview, send, reply; the upstream gets an image part.
        photo = tmp_path / "cat.png"
        photo.write_bytes(png())
        page.set_input_files("#photo-input", str(photo))
        expect(page.locator("#photo-preview")).to_be_visible()
        page.fill("#message", "看看我家的猫")
        page.click("#send-btn")
        expect(page.locator(".bubble.assistant .text").last).to_contain_text("收到了1张图片")
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        expect(page.locator("#photo-preview")).to_be_hidden()
        expect(page.locator(".bubble.user").last).to_contain_text("[图片]")
        expect(page.locator(".bubble.user").last).to_contain_text("看看我家的猫")
        turn = fake_llm.requests[-1]["body"]["messages"][-1]["content"]
        assert {"type": "text", "text": "看看我家的猫"} in turn
        image_url = "data:image/png;base64," + base64.b64encode(png()).decode()
        assert {"type": "image_url", "image_url": {"url": image_url}} in turn
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat.png"))
        default_users = ["今天有点累。", "看看我家的猫"]
        default_replies = page.locator(".bubble.assistant .text").all_inner_texts()
        assert len(default_replies) == 3 and default_replies[1] == final

        # The conversation list: the default one is open, titled by its first message, and cannot be deleted.
        drawer = page.locator("#conv-drawer")
        items = page.locator(".conv-item")
        default = page.locator('.conv-item[data-default="true"]')
        expect(drawer).to_be_hidden()
        page.click("#conv-btn")
        expect(drawer).to_be_visible()
        expect(page.locator("#conv-list")).to_have_attribute("aria-busy", "false")
        expect(default).to_have_count(1)
        expect(default.locator(".conv-open")).to_have_attribute("aria-current", "true")
        expect(default.locator(".conv-title")).to_have_text("今天有点累。")
        expect(default.locator(".conv-delete")).to_have_count(0)
        expect(page.locator("#chat-title")).to_have_text("今天有点累。")
        before = items.count()

        # 新对话 opens an empty conversation; the upstream sees none of the default one's history.
        page.click("#new-conv-btn")
        expect(drawer).to_be_hidden()
        expect(items).to_have_count(before + 1)
        expect(page.locator(".bubble")).to_have_count(1)
        expect(page.locator("#chat-title")).to_have_text("新对话")
        second_id = page.locator(".conv-item.current").get_attribute("data-id")
        assert second_id and second_id != default.get_attribute("data-id")
        second = page.locator(f'.conv-item[data-id="{second_id}"]')
        page.fill("#message", "我们换个话题吧")
        page.press("#message", "Enter")
        expect(page.locator(".bubble.assistant .text").last).to_contain_text("你说的是：「我们换个话题吧」")
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        sent = fake_llm.requests[-1]["body"]["messages"]
        assert [m["content"] for m in sent if m["role"] == "user"] == ["我们换个话题吧"], sent
        # After [DONE] the list is read again: the first message named the conversation, now the most recent.
        expect(second.locator(".conv-title")).to_have_text("我们换个话题吧")
        expect(page.locator("#chat-title")).to_have_text("我们换个话题吧")
        expect(items.first).to_have_attribute("data-id", second_id)

        # The upstream fails mid-reply: the text so far stays, the x_event error's message shows under the bubble.
        fake_llm.enqueue(chunks=["说到", "一半", "就断了"], drop_after=2)
        page.fill("#message", "再说一句")
        page.press("#message", "Enter")
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        last_reply = page.locator(".bubble.assistant").last
        expect(last_reply).to_contain_text("（未完成）")  # read back from the history: stored as partial
        expect(last_reply.locator(".text")).to_have_text("说到一半")
        expect(page.locator(".reply-note")).to_have_count(1)
        expect(page.locator(".bubble.assistant + .reply-note")).to_have_text(re.compile(r"\S"))
        expect(page.locator("#error")).to_be_hidden()
        assert len([m for m in fake_llm.requests[-1]["body"]["messages"] if m["role"] == "user"]) == 2
        page.click("#conv-btn")
        expect(second.locator(".conv-meta")).to_contain_text("4 条")
        page.screenshot(path=str(ARTIFACTS / "conversations.png"), animations="disabled")

        # A reload opens the default conversation first, unchanged.
        page.reload()
        expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")
        expect(page.locator("#chat-title")).to_have_text("今天有点累。")
        expect(page.locator(".bubble.user .text")).to_have_text(default_users)
        expect(page.locator(".bubble.assistant .text")).to_have_text(default_replies)

        # Switch to the second conversation and back; each shows its own history.
        page.click("#conv-btn")
        second.locator(".conv-open").click()
        expect(drawer).to_be_hidden()
        expect(page.locator("#chat-title")).to_have_text("我们换个话题吧")
        expect(page.locator(".bubble.user .text")).to_have_text(["我们换个话题吧", "再说一句"])
        expect(page.locator(".bubble .partial-tag")).to_have_count(1)
        page.click("#conv-btn")
        default.locator(".conv-open").click()
        expect(drawer).to_be_hidden()
        expect(page.locator(".bubble.user .text")).to_have_text(default_users)
        expect(page.locator(".bubble.assistant .text")).to_have_text(default_replies)
        expect(page.locator(".reply-note")).to_have_count(0)

        # Rename (a prompt with the current title) and delete (a confirm) the second conversation.
        dialogs: list[tuple[str, str, str]] = []

        def answer(dialog, text: str | None = None) -> None:
            dialogs.append((dialog.type, dialog.message, dialog.default_value))
            if text is None:
                dialog.accept()
            else:
                dialog.accept(text)

        page.click("#conv-btn")
        page.once("dialog", lambda dialog: answer(dialog, "  换个话题  "))
        second.locator(".conv-rename").click()
        expect(second.locator(".conv-title")).to_have_text("换个话题")
        assert dialogs[-1][0] == "prompt" and dialogs[-1][2] == "我们换个话题吧"
        page.once("dialog", answer)
        second.locator(".conv-delete").click()
        expect(page.locator("#notice")).to_have_text("会话已删除")
        assert dialogs[-1][0] == "confirm" and "换个话题" in dialogs[-1][1]
        expect(second).to_have_count(0)
        expect(items).to_have_count(before)
        expect(default.locator(".conv-open")).to_have_attribute("aria-current", "true")
        page.click("#conv-close")
        expect(drawer).to_be_hidden()
        expect(page.locator(".bubble.user .text")).to_have_text(default_users)

        # Clearing leaves only the opening message.
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#clear-btn")
        expect(page.locator("#notice")).to_have_text("当前聊天已清空")
        expect(page.locator(".bubble")).to_have_count(1)
        expect(page.locator(".bubble.opening")).to_have_text(OPENING)
        assert errors == []

        # A token the server rejects, with a refresh token it rejects too, sends the user back to the login page.
        assert page.evaluate("localStorage.getItem('aichat.refresh')")  # the SMS login handed one out
        page.evaluate("localStorage.setItem('aichat.token', 'not-a-jwt'); localStorage.setItem('aichat.refresh', 'x')")
        page.reload()
        expect(page.locator("#login-view")).to_be_visible()
        expect(page.locator("#error")).to_have_text("登录已失效，请重新登录")
        assert page.evaluate("[localStorage.getItem('aichat.token'), localStorage.getItem('aichat.refresh')]") == [
            None,
            None,
        ]

        # Log in again, log out, then a wrong code shows the contract's Chinese message.
        page.click("#login-btn")
        page.click('.role-card[data-role="naitang"]')
        expect(page.locator(".bubble.opening")).to_be_visible()
        page.click("#logout-btn")
        expect(page.locator("#login-view")).to_be_visible()
        assert page.evaluate("localStorage.getItem('aichat.token')") is None
        page.fill("#code", "0000")
        page.click("#login-btn")
        expect(page.locator("#error")).to_have_text("验证码错误或已过期")
        expect(page.locator("#login-view")).to_be_visible()
    finally:
        context.close()
    # The browser logs each deliberate 401 as a failed resource load; anything else is a bug.
    unexpected = [e for e in errors if not re.search(r"Failed to load resource: .* 401", e)]
    assert unexpected == []


def test_webserver_serves_only_the_web_root(site):
    conn = http.client.HTTPConnection(site.host, site.port, timeout=5)

    def get(path: str) -> tuple[int, str, str, bytes]:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.getheader("Content-Type"), res.getheader("Cache-Control"), res.read()

    try:
        status, ctype, cache, body = get("/")
        assert (status, ctype, cache) == (200, "text/html; charset=utf-8", "no-store") and b'id="app"' in body
        assert get("/app.js")[:2] == (200, "text/javascript; charset=utf-8")
        assert get("/style.css")[:2] == (200, "text/css; charset=utf-8")
        status, ctype, _, body = get("/config.json")
        assert status == 200 and ctype.startswith("application/json") and b"chat_base_url" in body
        for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fREADME.md", "/nope.js", "/x%00.js"):
            assert get(path)[0] == 404, path
    finally:
        conn.close()


WEATHER_Q = "杭州现在天气怎么样?"


def test_tool_progress_and_skills(browser, site, chat_service, fake_llm, fake_tools):
    context = browser.new_context(viewport={"width": 420, "height": 820}, locale="zh-CN")
    context.set_default_timeout(10_000)
    context.route(EXTERNAL, lambda route: route.fulfill(status=200, content_type="image/png", body=png()))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    try:
        page.goto(site.url)
        page.click("#login-btn")
        page.click('.role-card[data-role="wanqing"]')
        expect(page.locator("#chat-name")).to_have_text("晚晴")
        expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")
        if page.locator(".bubble").count() > 1:
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#clear-btn")
            expect(page.locator(".bubble")).to_have_count(1)

        # The skills bar: a chip per skill, but not web search (the server lists it; it cannot be run directly).
        listed = Client(chat_service.base_url).get("/chat/role/skills", params={"role_code": "wanqing"}).json()
        assert [s["skill_code"] for s in listed["skills"]] == ["stargazing", "gossip", "recall", "clock", "search"]
        chips = page.locator("#skills-bar .skill-chip")
        expect(chips).to_have_text(["观星", "八卦", "推演", "看时辰"])
        expect(page.locator('.skill-chip[data-skill="search"]')).to_have_count(0)

        # A question the stand-in model answers with a weather lookup. The provider is slowed down and the
        # answer streams slowly, so the live line is seen running and then ended, while the reply still streams.
        fake_tools.fail("/v3/geocode", delay=1.0, times=1)
        fake_llm.enqueue()  # round one, unscripted: the model calls get_weather
        fake_llm.enqueue(delay=0.25)  # round two: the answer built on the tool result, slowly
        page.fill("#message", WEATHER_Q)
        page.press("#message", "Enter")
        live = page.locator(".bubble.assistant.streaming + .tool-trace .tool-line")
        expect(live).to_have_count(1)
        expect(live).to_have_class(re.compile(r"\brunning\b"))
        expect(live).to_have_attribute("data-name", "get_weather")
        expect(live.locator(".tool-display")).to_have_text("正在查询杭州天气…")
        expect(live).to_have_class(re.compile(r"\bok\b"))
        expect(live.locator(".tool-display")).to_have_text("杭州市 晴 21°C")
        expect(live.locator(".tool-icon")).to_have_text("✓")
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        # After [DONE] the history (include_tools=1) is read back: the line stays under the stored reply.
        reply = page.locator(".bubble.assistant").last
        expect(reply.locator(".text")).to_contain_text("21")
        expect(reply).to_have_attribute("data-id", re.compile(r"\S"))
        line = page.locator(".bubble.assistant + .tool-trace .tool-line")
        expect(line).to_have_count(1)
        expect(line).to_have_class(re.compile(r"\bok\b"))
        expect(line.locator(".tool-display")).to_have_text("杭州市 晴 21°C")
        first, second = (r["body"] for r in fake_llm.requests)
        assert "get_weather" in {t["function"]["name"] for t in first["tools"]}
        assert second["messages"][-1]["role"] == "tool"
        answer = reply.locator(".text").inner_text()

        # A reload shows the same finished line from the history.
        page.reload()
        expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")
        expect(page.locator(".bubble.user .text")).to_have_text([WEATHER_Q])
        expect(page.locator(".bubble.assistant .text").last).to_have_text(answer)
        expect(line).to_have_count(1)
        expect(line.locator(".tool-display")).to_have_text("杭州市 晴 21°C")
        expect(line.locator(".tool-icon")).to_have_text("✓")

        # 观星 asks for a city inline (杭州 by default), then streams like a message: its tool line, an answer.
        fake_llm.reset()
        fake_llm.enqueue(delay=0.2)
        page.locator('.skill-chip[data-skill="stargazing"]').click()
        expect(page.locator("#skill-form")).to_be_visible()
        expect(page.locator("#skill-arg-label")).to_contain_text("观星")
        expect(page.locator("#skill-arg")).to_have_value("杭州")
        page.fill("#skill-arg", "北京")
        page.press("#skill-arg", "Enter")
        expect(page.locator("#skill-form")).to_be_hidden()
        expect(page.locator(".bubble.user .text").last).to_have_text("（使用技能「观星」：北京）")
        expect(live).to_have_count(1)
        expect(live.locator(".tool-display")).to_have_text("北京市 多云 8°C")
        expect(chips.first).to_be_disabled()
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        expect(chips.first).to_be_enabled()
        expect(page.locator(".bubble.user .text")).to_have_text([WEATHER_Q, "（使用技能「观星」：北京）"])
        expect(page.locator(".bubble.assistant .text").last).to_contain_text("北京")
        expect(line).to_have_count(2)
        expect(line.last.locator(".tool-display")).to_have_text("北京市 多云 8°C")
        expect(line.last).to_have_class(re.compile(r"\bok\b"))
        (request,) = fake_llm.requests  # the tool ran first; one model round answered about it
        assert request["body"]["messages"][-3]["content"] == "（使用技能「观星」：北京）"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "skills.png"), animations="disabled")
    finally:
        context.close()
    assert errors == []


# -- voice and accounts -----------------------------------------------------------------------------------

# About 3.5 s of the fake's tones (60 ms per spoken character): long enough to be seen playing and paused.
LONG_REPLY = (
    "喵呜～今天的风有一点凉，记得多穿一件衣服哦。晚上早点睡，明天我们一起去晒太阳，好不好？我会一直在这里陪着你的！"
)
SECOND_REPLY = "再给你讲一个小故事吧：从前有一只小猫，它最喜欢在窗台上晒太阳，一晒就是一整个下午。"
# The browser logs each deliberate error answer (400 bad input, 401, 409, 502) as a failed resource load.
EXPECTED_LOAD_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (400|401|409|502)")
PLAYER = """async () => {
  const audio = document.querySelector("#voice-player");
  const blob = audio.src.startsWith("blob:") ? await (await fetch(audio.src)).blob() : null;
  return { paused: audio.paused, time: audio.currentTime, duration: audio.duration, src: audio.src,
           type: blob && blob.type, size: blob && blob.size };
}"""
PLAYING = """() => {
  const audio = document.querySelector("#voice-player");
  return audio.src.startsWith("blob:") && !audio.paused && audio.currentTime > 0.2 && audio.duration > 1;
}"""


def new_page(browser) -> tuple[object, Page, list[str]]:
    """A phone-sized page whose outside requests are answered locally, and the console errors it logs."""
    context = browser.new_context(viewport={"width": 420, "height": 820}, locale="zh-CN")
    context.set_default_timeout(10_000)
    context.route(EXTERNAL, lambda route: route.fulfill(status=200, content_type="image/png", body=png()))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    return context, page, errors


def unexpected(errors: list[str]) -> list[str]:
    return [e for e in errors if not EXPECTED_LOAD_ERROR.search(e)]


def new_account(login_service) -> tuple[str, str]:
    """A fresh username and password, registered through the API."""
    username, password = f"u_{uuid.uuid4().hex[:12]}", f"Pw-{uuid.uuid4().hex[:12]}"
    res = Client(login_service.base_url).post("/register", {"username": username, "password": password})
    assert res.status_code == 200, res.text
    return username, password


def password_login(page: Page, account: str, password: str) -> None:
    """Log in on the 账号密码登录 tab; the role list follows."""
    page.click("#tab-password")
    expect(page.locator("#password-form")).to_be_visible()
    expect(page.locator("#login-form")).to_be_hidden()
    page.fill("#account", account)
    page.fill("#password", password)
    page.click("#password-login-btn")
    expect(page.locator("#roles-view")).to_be_visible()


def open_naitang(page: Page) -> None:
    page.click('.role-card[data-role="naitang"]')
    expect(page.locator("#chat-name")).to_have_text("奶糖")
    expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")
    expect(page.locator(".bubble.user .text").last).to_have_text(text)
    expect(page.locator(".bubble.streaming")).to_have_count(0)


def stored(page: Page) -> dict[str, str | None]:
    """The tokens the page keeps."""
    script = "({access: localStorage.getItem('aichat.token'), refresh: localStorage.getItem('aichat.refresh')})"
    return page.evaluate(script)


def test_register_log_in_with_the_password_and_hear_a_reply(browser, site, fake_llm, fake_tts):
    context, page, errors = new_page(browser)
    voice_calls: list[str] = []
    page.on("request", lambda req: voice_calls.append(req.url) if "/chat/voice" in req.url else None)
    username, password = f"u_{uuid.uuid4().hex[:12]}", f"Pw-{uuid.uuid4().hex[:12]}"
    try:
        page.goto(site.url)

        # Register: the server's message names the field at fault; then the account, logged in at once.
        expect(page.locator("#tab-sms")).to_have_attribute("aria-selected", "true")
        page.click("#tab-register")
        expect(page.locator("#tab-register")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#register-form")).to_be_visible()
        expect(page.locator("#login-form")).to_be_hidden()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "register.png"))
        page.fill("#reg-username", "ab")
        page.fill("#reg-password", password)
        page.click("#register-btn")
        expect(page.locator("#error")).to_contain_text("username")
        page.fill("#reg-username", username)
        page.fill("#reg-nickname", "<b>小鱼干</b>")
        page.click("#register-btn")
        expect(page.locator("#roles-view")).to_be_visible()
        expect(page.locator("#notice")).to_have_text("注册成功")
        expect(page.locator("#user-label")).to_have_text("<b>小鱼干</b>")  # text, never markup
        assert page.locator("#user-label b").count() == 0
        tokens = stored(page)
        assert tokens["access"] and tokens["refresh"]

        # The same username again is 409 AccountExists; a wrong password is the one 401 InvalidCredentials.
        page.click("#logout-btn")
        expect(page.locator("#login-view")).to_be_visible()
        assert stored(page) == {"access": None, "refresh": None}
        page.click("#tab-register")
        page.fill("#reg-username", username)
        page.fill("#reg-password", password)
        page.click("#register-btn")
        expect(page.locator("#error")).to_have_text("用户名已被注册")
        page.click("#tab-password")
        expect(page.locator("#error")).to_be_hidden()
        page.fill("#account", username)
        page.fill("#password", "not-the-password")
        page.click("#password-login-btn")
        expect(page.locator("#error")).to_have_text("账号或密码错误")
        expect(page.locator("#login-view")).to_be_visible()
        password_login(page, username, password)
        expect(page.locator("#user-label")).to_have_text("<b>小鱼干</b>")

        # Chat with 奶糖: the stored reply gets ▶; the opening message and the user's own do not.
        open_naitang(page)
        expect(page.locator(".voice-btn")).to_have_count(0)
        fake_llm.enqueue(text=LONG_REPLY)
        say(page, "给我讲讲今天吧")
        reply = page.locator(".bubble.assistant").nth(1)
        expect(reply.locator(".text")).to_have_text(LONG_REPLY)
        button = reply.locator(".voice-btn")
        expect(button).to_have_text("▶")
        expect(button).to_have_attribute("data-state", "idle")
        expect(page.locator(".bubble.opening .voice-btn, .bubble.user .voice-btn")).to_have_count(0)

        # ▶: loading while the (slowed) TTS works, then ⏸ while the MP3 plays.
        fake_tts.fail(status=0, delay=1.0, times=1)
        button.click()
        expect(button).to_have_attribute("data-state", "loading")
        expect(button).to_have_attribute("aria-busy", "true")
        expect(button).to_have_attribute("data-state", "playing")
        expect(button).to_have_text("⏸")
        page.wait_for_function(PLAYING)
        played = page.evaluate(PLAYER)
        assert played["type"] == "audio/mpeg" and played["size"] > 1000, played
        assert 2.5 < played["duration"] < 6 and not played["paused"], played
        assert len(voice_calls) == 1 and fake_tts.synth_count() == 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "voice.png"), animations="disabled")

        # ⏸ stops it; ▶ goes on from there, from the page's cache (no second request).
        button.click()
        expect(button).to_have_attribute("data-state", "idle")
        paused = page.evaluate(PLAYER)
        assert paused["paused"] and paused["time"] > 0
        button.click()
        expect(button).to_have_attribute("data-state", "playing")
        page.wait_for_function(f"() => document.querySelector('#voice-player').currentTime > {paused['time']}")
        assert len(voice_calls) == 1

        # A second reply whose synthesis fails: the server's message in the error notice, ▶ again.
        fake_llm.enqueue(text=SECOND_REPLY)
        say(page, "再讲一个")
        second = page.locator(".bubble.assistant").nth(2).locator(".voice-btn")
        first = page.locator(".bubble.assistant").nth(1).locator(".voice-btn")  # the history was drawn again
        expect(first).to_have_attribute("data-state", "playing")  # still playing through the redraw
        fake_tts.fail(status=500, times=1)
        second.click()
        expect(page.locator("#error")).to_contain_text("语音服务返回错误")
        expect(second).to_have_attribute("data-state", "idle")
        expect(first).to_have_attribute("data-state", "idle")  # the other clip stopped when this one was asked for

        # Tapped again it plays, and only one clip plays at a time.
        second.click()
        expect(second).to_have_attribute("data-state", "playing")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator('.voice-btn[data-state="playing"]')).to_have_count(1)
        page.wait_for_function(PLAYING)
        second_src = page.evaluate(PLAYER)["src"]
        first.click()
        expect(first).to_have_attribute("data-state", "playing")
        expect(second).to_have_attribute("data-state", "idle")
        assert page.evaluate(PLAYER)["src"] != second_src
        assert len(voice_calls) == 3  # the first clip came from the cache
        expect(first).to_have_attribute("data-state", "idle", timeout=15_000)  # played to the end
        assert page.evaluate("document.querySelector('#voice-player').ended")
    finally:
        context.close()
    assert unexpected(errors) == []


def test_a_refused_access_token_is_renewed_with_the_refresh_token(browser, site, login_service, fake_llm):
    username, password = new_account(login_service)
    context, page, errors = new_page(browser)
    calls: list[str] = []
    page.on("request", lambda req: calls.append(f"{req.method} {req.url.split('?')[0].split('/', 3)[-1]}"))
    try:
        page.goto(site.url)
        password_login(page, username, password)
        open_naitang(page)
        first = stored(page)

        # The access token goes bad (as if expired): the next message is refused, renewed and sent again once.
        page.evaluate("localStorage.setItem('aichat.token', 'garbage')")
        calls.clear()
        say(page, "你还在吗？")
        expect(page.locator(".bubble.assistant .text").last).to_contain_text("你还在吗？")
        assert calls.count("POST chat/stream") == 2 and calls.count("POST token/refresh") == 1, calls
        assert len(fake_llm.requests) == 1  # one completion: the refused attempt never reached the model
        expect(page.locator(".bubble.user")).to_have_count(1)
        renewed = stored(page)
        assert renewed["access"] not in (None, "garbage", first["access"])
        assert renewed["refresh"] not in (None, first["refresh"])  # rotated

        # A reload with a bad token: the calls refused while the (slowed) refresh runs share that one refresh.
        def slow_refresh(route) -> None:
            time.sleep(0.5)
            route.continue_()

        page.route("**/token/refresh", slow_refresh)
        page.evaluate("localStorage.setItem('aichat.token', 'garbage')")
        calls.clear()
        page.reload()
        expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")
        expect(page.locator(".bubble.user .text")).to_have_text(["你还在吗？"])
        expect(page.locator("#user-label")).to_have_text(username)
        assert calls.count("POST token/refresh") == 1, calls
        assert calls.count("GET me") == 2 and calls.count("GET chat/conversations") == 2, calls  # both refused once
        page.unroute("**/token/refresh")
        again = stored(page)
        assert again["refresh"] not in (None, renewed["refresh"])

        # The spent refresh token presented again (a thief): the server ends the session, so the next call is
        # refused, cannot be renewed, and the user is back at the login page; the message is not sent.
        reuse = Client(login_service.base_url).post("/token/refresh", {"refresh_token": renewed["refresh"]})
        assert reuse.status_code == 401
        fake_llm.reset()
        page.fill("#message", "这条发不出去")
        page.press("#message", "Enter")
        expect(page.locator("#login-view")).to_be_visible()
        expect(page.locator("#error")).to_have_text("登录已失效，请重新登录")
        assert stored(page) == {"access": None, "refresh": None}
        assert fake_llm.requests == []
    finally:
        context.close()
    assert unexpected(errors) == []


def test_the_profile_panel(browser, site, login_service):
    username, password = new_account(login_service)
    other = Client(login_service.base_url)
    other_token = other.post("/login/password", {"account": username, "password": password}).json()["access_token"]
    other.token = other_token
    context, page, errors = new_page(browser)
    try:
        page.goto(site.url)
        password_login(page, username, password)
        page.click("#profile-btn")
        expect(page.locator("#profile-view")).to_be_visible()
        expect(page).to_have_url(re.compile(r"#/me$"))
        expect(page.locator("#profile-card")).to_have_attribute("aria-busy", "false")
        expect(page.locator("#me-name")).to_have_text(username)
        expect(page.locator("#me-account")).to_have_text(f"@{username}")
        expect(page.locator("#me-facts")).to_contain_text("用户名")
        expect(page.locator("#nickname")).to_have_value("")
        expect(page.locator("#password-set-title")).to_have_text("修改密码")
        expect(page.locator("#current-password")).to_be_visible()

        # Sessions: this one (本机, no end button) and the one logged in through the API.
        items = page.locator("#session-list .session-item")
        expect(items).to_have_count(2)
        here = page.locator('.session-item[data-current="true"]')
        expect(here).to_have_count(1)
        expect(here).to_contain_text("本机")
        expect(here.locator(".session-end")).to_have_count(0)
        expect(here).to_contain_text("Chrome")

        # The nickname, saved and shown after a reload; a refused avatar URL shows the server's message.
        page.fill("#nickname", "晒太阳的猫")
        page.fill("#avatar-url", "http://example.com/a.png")
        page.click("#profile-save")
        expect(page.locator("#error")).to_contain_text("avatar_url")
        page.fill("#avatar-url", "https://example.com/a.png")
        page.fill("#bio", "<img src=x onerror=alert(1)>")
        page.click("#profile-save")
        expect(page.locator("#notice")).to_have_text("资料已保存")
        expect(page.locator("#me-name")).to_have_text("晒太阳的猫")
        expect(page.locator("#user-label")).to_have_text("晒太阳的猫")
        expect(page.locator("#me-avatar")).to_have_attribute("src", "https://example.com/a.png")
        expect(page.locator("#me-facts")).to_contain_text("<img src=x onerror=alert(1)>")
        page.reload()
        expect(page.locator("#profile-view")).to_be_visible()
        expect(page.locator("#nickname")).to_have_value("晒太阳的猫")
        expect(page.locator("#me-name")).to_have_text("晒太阳的猫")
        expect(page.locator("#bio")).to_have_value("<img src=x onerror=alert(1)>")
        assert other.get("/me").json()["user"]["nickname"] == "晒太阳的猫"
        # Emptied, the bio is cleared (sent as null).
        page.fill("#bio", "")
        page.click("#profile-save")
        expect(page.locator("#notice")).to_have_text("资料已保存")
        assert other.get("/me").json()["user"]["bio"] is None

        # End the other session: it is gone from the list, and its token stops working.
        assert other.get("/me").status_code == 200
        page.locator('.session-item:not([data-current="true"]) .session-end').click()
        expect(page.locator("#notice")).to_have_text("会话已结束")
        expect(items).to_have_count(1)
        expect(here).to_have_count(1)
        assert other.get("/me").status_code == 401
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "profile.png"), full_page=True)

        # Change the password: a wrong current one is an error here, not a logout; the right one works.
        new_password = f"Pw-{uuid.uuid4().hex[:12]}"
        page.fill("#current-password", "not-the-password")
        page.fill("#new-password", new_password)
        page.click("#password-set-btn")
        expect(page.locator("#error")).to_have_text("当前密码错误")
        expect(page.locator("#profile-view")).to_be_visible()
        page.fill("#current-password", password)
        page.click("#password-set-btn")
        expect(page.locator("#notice")).to_have_text("密码已修改")
        expect(page.locator("#new-password")).to_have_value("")

        # 退出所有设备 (after a confirm): back at the login page, and the token is dead on the server too.
        token = stored(page)["access"]
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#logout-all")
        expect(page.locator("#login-view")).to_be_visible()
        expect(page.locator("#notice")).to_have_text("已在所有设备退出登录")
        assert stored(page) == {"access": None, "refresh": None}
        assert Client(login_service.base_url, token=token).get("/me").status_code == 401

        # The new password logs in; 退出登录 in the panel ends that session on the server.
        password_login(page, username, new_password)
        token = stored(page)["access"]
        page.click("#profile-btn")
        expect(page.locator("#session-list .session-item")).to_have_count(1)
        page.click("#logout-here")
        expect(page.locator("#login-view")).to_be_visible()
        assert Client(login_service.base_url, token=token).get("/me").status_code == 401
    finally:
        context.close()
    assert unexpected(errors) == []


# -- idempotency keys and 继续 ----------------------------------------------------------------------------

KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A request the test cuts off on purpose (a network error) is logged as a failed load too.
ABORTED_LOAD = re.compile(r"Failed to load resource: net::ERR_FAILED")


def turn_posts(page: Page, path: str) -> list[dict[str, str | None]]:
    """Every POST to the chat path the page sends from now on: its Idempotency-Key and its body."""
    seen: list[dict[str, str | None]] = []

    def record(req) -> None:
        if req.method == "POST" and req.url.split("?")[0].endswith(path):
            seen.append({"key": req.headers.get("idempotency-key"), "body": req.post_data})

    page.on("request", record)
    return seen


def chat_history(chat_service, page: Page) -> list[dict]:
    """The page user's history with 奶糖, read through the API with the page's own token."""
    return history(Client(chat_service.base_url, token=stored(page)["access"]))


def lose_first_answer(answers: list[str]):
    """A route handler: the server runs the request, but its first answer never reaches the page (the
    connection fails); later ones pass. Every answer's body is kept in `answers`."""

    def handle(route) -> None:
        response = route.fetch()
        answers.append(response.text())
        if len(answers) == 1:
            route.abort("failed")
        else:
            route.fulfill(response=response)

    return handle


WATCH_TEXT_JS = """id => {
      // Watch the whole list: the bubble may be drawn anew when the history is read again.
      const textOf = () => document.querySelector(`.bubble.assistant[data-id="${id}"] .text`);
      window.seenTexts = [];
      let last = textOf() ? textOf().textContent : null;
      new MutationObserver(() => {
        const text = textOf();
        if (text && text.textContent !== last) {
          last = text.textContent;
          window.seenTexts.push(last);
        }
      }).observe(document.querySelector("#messages"), { childList: true, characterData: true, subtree: true });
    }"""


def watch_bubble_text(page, reply_id) -> None:
    """Record in window.seenTexts each text the reply's bubble shows from now on (a redraw included)."""
    page.evaluate(WATCH_TEXT_JS, reply_id)


def frames_of(body: str) -> list[dict]:
    return [
        json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:") and line[5:].strip() != "[DONE]"
    ]


def test_every_send_has_an_idempotency_key_and_a_resend_reuses_it(browser, site, login_service, chat_service, fake_llm):
    username, password = new_account(login_service)
    context, page, errors = new_page(browser)
    posts = turn_posts(page, "/chat/stream")
    try:
        page.goto(site.url)
        password_login(page, username, password)
        open_naitang(page)

        # Two sends: each a well-formed key of its own.
        say(page, "第一句")
        say(page, "第二句")
        assert len(posts) == 2, posts
        assert all(p["key"] and KEY.match(p["key"]) for p in posts), posts
        assert posts[0]["key"] != posts[1]["key"]

        # The access token goes bad: refused (401), renewed, sent again with the same key; one message stored.
        page.evaluate("localStorage.setItem('aichat.token', 'garbage')")
        posts.clear()
        say(page, "第三句")
        expect(page.locator(".bubble.assistant .text").last).to_contain_text("第三句")
        assert len(posts) == 2 and posts[0]["key"] == posts[1]["key"], posts
        assert KEY.match(posts[0]["key"]) and posts[0]["body"] == posts[1]["body"]
        users = [m["content"] for m in chat_history(chat_service, page) if m["sender_role"] == "user"]
        assert users == ["第一句", "第二句", "第三句"]

        # The server says the same request still runs (409 RequestInProgress): sent again after Retry-After.
        refused: list[float] = []

        def in_progress(route) -> None:
            if not refused:
                refused.append(time.monotonic())
                route.fulfill(
                    status=409,
                    headers={
                        "Content-Type": "application/json",
                        "Retry-After": "1",
                        "Access-Control-Allow-Origin": "*",
                        "Access-Control-Expose-Headers": "Retry-After",
                    },
                    body=json.dumps({"success": False, "code": "RequestInProgress", "message": "同一请求正在处理中"}),
                )
            else:
                refused.append(time.monotonic())
                route.continue_()

        page.route("**/chat/stream", in_progress)
        posts.clear()
        fake_llm.reset()
        say(page, "第四句")
        page.unroute("**/chat/stream")
        expect(page.locator(".bubble.assistant .text").last).to_contain_text("第四句")
        expect(page.locator("#error")).to_be_hidden()
        assert len(posts) == 2 and posts[0]["key"] == posts[1]["key"], posts
        assert refused[1] - refused[0] >= 0.9  # it waited for Retry-After
        assert len(fake_llm.requests) == 1

        # No answer reaches the page (the server did run it): sent again with the same key, the repeat is the
        # stored reply (replayed), drawn like a live one; no second message, no second completion.
        answers: list[str] = []
        lost_then_replayed = lose_first_answer(answers)

        fake_llm.reset()
        fake_llm.enqueue(chunks=["记", "住", "了"])
        page.route("**/chat/stream", lost_then_replayed)
        posts.clear()
        say(page, "第五句")
        page.unroute("**/chat/stream")
        expect(page.locator(".bubble.assistant .text").last).to_have_text("记住了")
        expect(page.locator("#error")).to_be_hidden()
        assert len(posts) == 2 and posts[0]["key"] == posts[1]["key"], posts
        first, again = (frames_of(a) for a in answers)
        assert first[0]["x_event"].get("replayed") is not True and again[0]["x_event"]["replayed"] is True
        assert len(fake_llm.requests) == 1
        stored_turns = chat_history(chat_service, page)
        assert [m["content"] for m in stored_turns if m["sender_role"] == "user"][-1] == "第五句"
        assert len(stored_turns) == 10 and stored_turns[-1]["content"] == "记住了"
        expect(page.locator(".bubble.user")).to_have_count(5)
    finally:
        context.close()
    assert [e for e in unexpected(errors) if not ABORTED_LOAD.search(e)] == []


def test_a_cut_reply_is_continued_in_the_same_bubble(browser, site, login_service, chat_service, fake_llm):
    username, password = new_account(login_service)
    context, page, errors = new_page(browser)
    posts = turn_posts(page, "/chat/continue")
    try:
        page.goto(site.url)
        password_login(page, username, password)
        open_naitang(page)

        # The upstream drops mid-reply: the part so far, stored as partial, with 继续 (and the error under it).
        fake_llm.enqueue(chunks=["一", "二", "三"], drop_after=2)
        say(page, "数数")
        reply = page.locator(".bubble.assistant").last
        expect(reply.locator(".text")).to_have_text("一二")
        expect(reply.locator(".partial-tag")).to_have_text("（未完成）")
        button = reply.locator(".continue-btn")
        expect(button).to_have_text("继续")
        expect(button).to_be_enabled()
        expect(page.locator(".continue-btn")).to_have_count(1)
        expect(page.locator(".reply-note")).to_have_count(1)
        reply_id = reply.get_attribute("data-id")
        assert reply_id
        same = page.locator(f'.bubble.assistant[data-id="{reply_id}"]')

        # 继续: only the new text streams, into that bubble; no new bubble, no user message.
        fake_llm.reset()
        fake_llm.enqueue(chunks=["三", "四"], delay=0.5)
        # What that very bubble's text node shows as the stream goes (it is replaced once the history is read).
        watch_bubble_text(page, reply_id)
        button.click()
        expect(page.locator(f'.bubble.assistant.streaming[data-id="{reply_id}"]')).to_have_count(1)
        expect(page.locator("#send-btn")).to_be_disabled()
        expect(page.locator(".continue-btn")).to_have_count(0)
        expect(page.locator(".bubble")).to_have_count(3)  # the opening, 数数, the reply
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        assert page.evaluate("window.seenTexts") == ["一二三", "一二三四"]  # only the new text, appended in place
        expect(same.locator(".text")).to_have_text("一二三四")
        expect(page.locator(".bubble")).to_have_count(3)
        expect(page.locator(".bubble.user .text")).to_have_text(["数数"])
        expect(page.locator(".continue-btn")).to_have_count(0)
        expect(same.locator(".partial-tag")).to_have_count(0)
        expect(page.locator(".reply-note")).to_have_count(0)
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#send-btn")).to_be_enabled()
        assert len(posts) == 1 and KEY.match(posts[0]["key"] or ""), posts
        assert json.loads(posts[0]["body"]) == {"message_id": int(reply_id)}
        (sent,) = fake_llm.requests
        assert sent["body"]["messages"][-1] == {"role": "assistant", "content": "一二", "partial": True}
        stored_turns = chat_history(chat_service, page)
        assert [m["sender_role"] for m in stored_turns] == ["user", "assistant"]
        assert stored_turns[-1]["id"] == int(reply_id) and stored_turns[-1]["content"] == "一二三四"
        assert stored_turns[-1]["is_partial"] is False
        page.reload()
        expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")
        expect(page.locator(".bubble.assistant .text")).to_have_text([OPENING, "一二三四"])
        expect(page.locator(".continue-btn")).to_have_count(0)

        # 继续 whose answer never reaches the page (the server did continue it): sent again with the same key, the
        # repeat is the stored outcome (replayed), and the bubble shows the reply once, never the cut part twice.
        fake_llm.enqueue(chunks=["五", "六", "七"], drop_after=1)
        say(page, "接着数")
        reply = page.locator(".bubble.assistant").last
        expect(reply.locator(".text")).to_have_text("五")
        reply_id = reply.get_attribute("data-id")
        answers: list[str] = []
        lost_then_replayed = lose_first_answer(answers)

        page.route("**/chat/continue", lost_then_replayed)
        fake_llm.reset()
        fake_llm.enqueue(chunks=["六", "七"])
        posts.clear()
        watch_bubble_text(page, reply_id)
        reply.locator(".continue-btn").click()
        expect(page.locator(".bubble.streaming")).to_have_count(0)
        expect(page.locator(".bubble.assistant .text").last).to_have_text("五六七")
        page.unroute("**/chat/continue")
        expect(page.locator("#error")).to_be_hidden()
        assert len(posts) == 2 and posts[0]["key"] == posts[1]["key"] and KEY.match(posts[0]["key"] or ""), posts
        first, again = (frames_of(a) for a in answers)
        assert "".join(f["choices"][0]["delta"]["content"] for f in first) == "六七"
        assert again[0]["x_event"]["replayed"] is True
        assert page.evaluate("window.seenTexts")[-1] == "五六七"
        assert all("五六七".startswith(t) for t in page.evaluate("window.seenTexts"))
        assert len(fake_llm.requests) == 1
        stored_turns = chat_history(chat_service, page)
        assert len(stored_turns) == 4 and stored_turns[-1]["content"] == "五六七" and not stored_turns[-1]["is_partial"]

        # A reply that is no longer the last (another device went on meanwhile): the server's 400 in the error
        # notice, and the history read again has no 继续 left.
        fake_llm.enqueue(chunks=["八", "九", "十"], drop_after=1)
        say(page, "再数")
        expect(page.locator(".bubble.assistant .text").last).to_have_text("八")
        expect(page.locator(".continue-btn")).to_have_count(1)
        elsewhere = Client(chat_service.base_url, token=stored(page)["access"])
        read_stream(elsewhere.post("/chat/stream", {"role_code": "naitang", "message": "换个设备说"}, stream=True))
        page.locator(".continue-btn").click()
        expect(page.locator("#error")).to_have_text("只能继续会话里最后一条回复")
        expect(page.locator(".bubble.user .text")).to_have_text(["数数", "接着数", "再数", "换个设备说"])
        expect(page.locator(".continue-btn")).to_have_count(0)
        expect(page.locator(".bubble.streaming")).to_have_count(0)
    finally:
        context.close()
    assert [e for e in unexpected(errors) if not ABORTED_LOAD.search(e)] == []
