"""get_hot_news: trending topics from Baidu's hot-search board and Toutiao's hot board, cached.

Neither board is an official API: both are fetched best-effort and normalised to {source, rank, title, url}.
A reply never waits on a slow site for long: the boards are fetched in parallel within a short timeout, a
board that fails is left out, and a stale list is served (and refreshed in the background) rather than
nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import quote

from .base import ToolError, ToolResult
from .http import JsonClient

log = logging.getLogger("aichat.tools")

TITLE_MAX_CHARS = 80
MAX_ITEMS = 30
# A stale list is served for this long after its cache time while a refresh runs.
STALE_GRACE_S = 3600.0


def baidu_board(client: JsonClient) -> list[dict[str, Any]]:
    """top.baidu.com's realtime board as JSON (`data.cards[].content[]`, some cards nesting a second level)."""
    body = client.get("/api/board", params={"platform": "wise", "tab": "realtime"})
    cards = body.get("data", {}).get("cards") if isinstance(body, dict) and isinstance(body.get("data"), dict) else None
    if not isinstance(cards, list):
        raise ToolError("百度热搜返回的数据无法识别")
    items: list[dict[str, Any]] = []
    for card in cards:
        for entry in card.get("content", []) if isinstance(card, dict) else []:
            nested = entry.get("content") if isinstance(entry, dict) else None
            for item in nested if isinstance(nested, list) else [entry]:
                if not isinstance(item, dict) or item.get("isTop"):
                    continue  # the pinned official entry is not a trend
                title = item.get("word") or item.get("query")
                if isinstance(title, str) and title.strip():
                    url = item.get("rawUrl") or item.get("url") or f"https://www.baidu.com/s?wd={quote(title)}"
                    items.append({"title": title.strip(), "url": url})
    return items


def toutiao_board(client: JsonClient) -> list[dict[str, Any]]:
    """toutiao.com's hot board (`data[].{Title, Url, ClusterIdStr}`)."""
    body = client.get("/hot-event/hot-board/", params={"origin": "toutiao_pc"})
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ToolError("头条热榜返回的数据无法识别")
    items: list[dict[str, Any]] = []
    for item in data:
        if not isinstance(item, dict):
            continue
        title = item.get("Title")
        if isinstance(title, str) and title.strip():
            cluster = item.get("ClusterIdStr") or item.get("ClusterId")
            url = item.get("Url") or (f"https://www.toutiao.com/trending/{cluster}/" if cluster else "")
            items.append({"title": title.strip(), "url": url})
    return items


BOARDS = {"baidu": ("百度热搜", baidu_board), "toutiao": ("今日头条", toutiao_board)}


class HotNews:
    """The boards' lists, normalised and cached for `cache_s`; see the module docstring."""

    def __init__(self, clients: dict[str, JsonClient], *, cache_s: float, fetch_timeout_s: float) -> None:
        self.clients = clients
        self.cache_s = cache_s
        self.fetch_timeout_s = fetch_timeout_s
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = []
        self._fetched_at = float("-inf")
        self._refreshing = False
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(clients) * 2), thread_name_prefix="hot-news")

    def _fetch(self) -> list[dict[str, Any]]:
        """Every configured board at once; those that answer in time, ranked per source."""
        futures = {name: self._pool.submit(BOARDS[name][1], client) for name, client in self.clients.items()}
        wait(futures.values(), timeout=self.fetch_timeout_s)
        items: list[dict[str, Any]] = []
        failures = []
        for name, future in futures.items():
            if not future.done():
                failures.append(f"{name}: timeout")
                continue
            try:
                board = future.result()
            except ToolError as exc:
                failures.append(f"{name}: {exc.message}")
                continue
            except Exception as exc:  # noqa: BLE001 - a parsing surprise in one board must not lose the other
                failures.append(f"{name}: {type(exc).__name__}")
                continue
            source = BOARDS[name][0]
            for rank, item in enumerate(board[:MAX_ITEMS], start=1):
                items.append(
                    {"source": source, "rank": rank, "title": item["title"][:TITLE_MAX_CHARS], "url": item["url"]}
                )
        if failures:
            log.warning("hot boards failed", extra={"failures": failures})
        if not items:
            raise ToolError("热搜榜暂时获取不到")
        return items

    def _refresh_in_background(self) -> None:
        def run() -> None:
            try:
                items = self._fetch()
            except ToolError:
                items = None
            with self._lock:
                if items:
                    self._items, self._fetched_at = items, time.monotonic()
                self._refreshing = False

        self._pool.submit(run)

    def items(self) -> list[dict[str, Any]]:
        """The cached list; fetched now when there is none, refreshed in the background when it is stale."""
        now = time.monotonic()
        with self._lock:
            age = now - self._fetched_at
            if age <= self.cache_s:
                return self._items
            if age <= self.cache_s + STALE_GRACE_S and self._items:
                if not self._refreshing:
                    self._refreshing = True
                    self._refresh_in_background()
                return self._items
        items = self._fetch()
        with self._lock:
            self._items, self._fetched_at = items, time.monotonic()
        return items

    def hot_news(self, limit: int) -> ToolResult:
        items = self.items()
        # Interleave the sources so a short list still shows both boards.
        by_source: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            by_source.setdefault(item["source"], []).append(item)
        picked: list[dict[str, Any]] = []
        for rank in range(MAX_ITEMS):
            for source_items in by_source.values():
                if rank < len(source_items) and len(picked) < limit:
                    picked.append(source_items[rank])
        sources = "、".join(by_source)
        return ToolResult({"items": picked, "sources": list(by_source)}, f"看了{sources}，{len(picked)} 条热点")
