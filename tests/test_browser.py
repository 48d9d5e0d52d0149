"""The web client end to end in Debian's Chromium (Playwright): login, roles, streaming, history, image,
conversations (create, switch, rename, delete, a stream error under its reply), clear; a role's skills and the
tool progress under a reply (the tool providers are loopback fakes)."""

from __future__ import annotations

import base64
import http.client
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.fake_tools import FakeTools
from dev.webserver import WebServer
from tests.conftest import IN_CI, chat_env
from tests.helpers import Client, ServerProcess

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
def fake_tools_server() -> Iterator[FakeTools]:
    """The fake weather and hot-board providers the chat server's tools call."""
    fake = FakeTools().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_tools(fake_tools_server: FakeTools) -> FakeTools:
    """The fake providers with no faults scripted and no requests recorded."""
    fake_tools_server.reset()
    return fake_tools_server


@pytest.fixture(scope="module")
def chat_service(start_server, sqlite_url, fake_llm_server, fake_tools_server) -> ServerProcess:
    """ChatService on SQLite, its tool providers pointed at the fakes."""
    return start_server("chat", **chat_env(fake_llm_server, sqlite_url, **fake_tools_server.env()))


@pytest.fixture(scope="module")
def site(start_server, sqlite_url, chat_service) -> Iterator[WebServer]:
    """Both services on SQLite and the web client pointed at them."""
    login = start_server("login", AICHAT_DB_URL=sqlite_url)
    web = WebServer(login_base_url=login.base_url, chat_base_url=chat_service.base_url).start()
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

        # A token the server rejects sends the user back to the login page.
        page.evaluate("localStorage.setItem('aichat.token', 'not-a-jwt')")
        page.reload()
        expect(page.locator("#login-view")).to_be_visible()
        expect(page.locator("#error")).to_have_text("登录已失效，请重新登录")
        assert page.evaluate("localStorage.getItem('aichat.token')") is None

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
