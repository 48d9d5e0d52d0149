"""Loopback fakes of the tool providers (AMap, QWeather, Baidu's and Toutiao's hot boards); never shipped.

One server answers all four on their real paths and in their real shapes, so the real tool clients run
against it: AMap `/v3/geocode/geo` and `/v3/weather/weatherInfo` (HTTP 200 with `status` "1"/"0"), QWeather
`/geo/v2/city/lookup`, `/v7/weather/now`, `/v7/weather/3d` (`code` "200", key in `X-QW-Api-Key`, gzip),
Baidu `/api/board` (`data.cards[].content[]`) and Toutiao `/hot-event/hot-board/` (`data[]`).

Tests script faults per path prefix with `fail(prefix, status=…, body=…, delay=…, times=…)` and read what was
asked in `requests`. The weather is deterministic per city, so a test can check a reply was built on it.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

AMAP_KEY = "fake-amap-key"
QWEATHER_KEY = "fake-qweather-key"

# city -> (AMap adcode, QWeather LocationID, weather now, temperature now, forecast [(day, night, high, low)])
CITIES: dict[str, tuple[str, str, str, int, list[tuple[str, str, int, int]]]] = {
    "杭州": ("330100", "101210101", "晴", 21, [("晴", "多云", 23, 14), ("小雨", "中雨", 18, 12), ("阴", "阴", 17, 11)]),
    "北京": ("110000", "101010100", "多云", 8, [("多云", "晴", 10, -1), ("晴", "晴", 9, -2), ("大风", "晴", 6, -4)]),
    "上海": ("310000", "101020100", "阴", 15, [("阴", "小雨", 16, 11), ("小雨", "阴", 14, 10), ("多云", "晴", 15, 9)]),
    "广州": (
        "440100",
        "101280101",
        "雷阵雨",
        27,
        [("雷阵雨", "多云", 29, 22), ("多云", "多云", 28, 21), ("晴", "晴", 27, 20)],
    ),
    "深圳": (
        "440300",
        "101280601",
        "多云",
        26,
        [("多云", "阵雨", 28, 22), ("阵雨", "阵雨", 27, 22), ("晴", "多云", 28, 21)],
    ),
    "成都": ("510100", "101270101", "小雨", 13, [("小雨", "阴", 14, 9), ("阴", "阴", 13, 8), ("多云", "阴", 15, 9)]),
}
WEEK = "1234567"
BAIDU_TOPICS = [f"百度热点话题{i}" for i in range(1, 31)]
TOUTIAO_TOPICS = [f"头条热榜事件{i}" for i in range(1, 31)]


def _city_of(text: str) -> str | None:
    for name in CITIES:
        if text.startswith(name) or name in text:
            return name
    return None


class FakeTools:
    """The fake providers' server (start/stop, scripted faults, recorded requests)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._faults: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> FakeTools:
        fake = self

        class Handler(_Handler):
            owner = fake

        httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The settings that point every provider here."""
        return {
            "AICHAT_AMAP_BASE_URL": self.base_url,
            "AICHAT_AMAP_KEY": AMAP_KEY,
            "AICHAT_QWEATHER_BASE_URL": self.base_url,
            "AICHAT_QWEATHER_KEY": QWEATHER_KEY,
            "AICHAT_BAIDU_BASE_URL": self.base_url,
            "AICHAT_TOUTIAO_BASE_URL": self.base_url,
        }

    # -- scripting ------------------------------------------------------------------------------------
    def fail(
        self,
        prefix: str,
        *,
        status: int = 200,
        body: Any = None,
        delay: float = 0.0,
        times: int | None = None,
    ) -> None:
        """Answer requests whose path starts with `prefix` with this status/body after `delay` seconds
        (`body` None: the normal answer, only delayed or with another status); `times` bounds how often."""
        with self._lock:
            self._faults.append({"prefix": prefix, "status": status, "body": body, "delay": delay, "times": times})

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["path"].startswith(prefix))

    def _fault_for(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            for fault in self._faults:
                if path.startswith(fault["prefix"]) and fault["times"] != 0:
                    if fault["times"] is not None:
                        fault["times"] -= 1
                    return dict(fault)
        return None

    def _record(self, path: str, query: dict[str, str], headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append({"path": path, "query": query, "headers": headers})


@contextmanager
def running() -> Iterator[FakeTools]:
    fake = FakeTools().start()
    try:
        yield fake
    finally:
        fake.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeTools
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.owner._record(parts.path, query, headers)
        fault = self.owner._fault_for(parts.path)
        if fault and fault["delay"]:
            end = time.monotonic() + fault["delay"]
            while time.monotonic() < end and not self.owner._stopping.is_set():
                time.sleep(0.02)
        status, body = self._answer(parts.path, query, headers)
        if fault:
            status = fault["status"]
            if fault["body"] is not None:
                body = fault["body"]
        self._send(status, body, gzip_it=parts.path.startswith(("/v7/", "/geo/")))

    def _send(self, status: int, body: Any, *, gzip_it: bool) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        if gzip_it:  # QWeather compresses every answer
            data = gzip.compress(data)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client gave up (a timeout under test): nothing to tell it
            self.close_connection = True

    # -- the providers' answers -----------------------------------------------------------------------
    def _answer(self, path: str, q: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        if path.startswith("/v3/"):
            return self._amap(path, q)
        if path.startswith(("/v7/", "/geo/v2/")):
            return self._qweather(path, q, headers)
        if path == "/api/board":
            content = [
                {
                    "word": t,
                    "desc": "",
                    "hotScore": str(10_000 - i),
                    "rawUrl": f"https://www.baidu.com/s?wd={i}",
                    "isTop": False,
                }
                for i, t in enumerate(BAIDU_TOPICS)
            ]
            content.insert(0, {"word": "置顶的官方消息", "isTop": True})
            return 200, {"success": True, "data": {"cards": [{"component": "hotList", "content": content}]}}
        if path == "/hot-event/hot-board/":
            data = [
                {
                    "ClusterIdStr": str(7000 + i),
                    "Title": t,
                    "HotValue": str(90_000 - i),
                    "Url": f"https://www.toutiao.com/trending/{7000 + i}/",
                }
                for i, t in enumerate(TOUTIAO_TOPICS)
            ]
            return 200, {"data": data, "status": "success"}
        return 404, {"error": "not found"}

    def _amap(self, path: str, q: dict[str, str]) -> tuple[int, Any]:
        if q.get("key") != AMAP_KEY:
            return 200, {"status": "0", "info": "INVALID_USER_KEY", "infocode": "10001"}
        if path == "/v3/geocode/geo":
            city = _city_of(q.get("address", ""))
            if city is None:
                return 200, {"status": "1", "info": "OK", "infocode": "10000", "count": "0", "geocodes": []}
            geocode = {
                "formatted_address": f"{city}市",
                "province": f"{city}市",
                "city": f"{city}市",
                "adcode": CITIES[city][0],
                "location": "120.15,30.28",
            }
            return 200, {"status": "1", "info": "OK", "infocode": "10000", "count": "1", "geocodes": [geocode]}
        if path == "/v3/weather/weatherInfo":
            city = next((c for c, v in CITIES.items() if v[0] == q.get("city")), None)
            if city is None:
                return 200, {"status": "0", "info": "INVALID_PARAMS", "infocode": "20000"}
            _, _, now, temp, days = CITIES[city]
            if q.get("extensions") == "all":
                casts = [
                    {
                        "date": f"2026-12-0{2 + i}",
                        "week": WEEK[(2 + i) % 7],
                        "dayweather": d,
                        "nightweather": n,
                        "daytemp": str(hi),
                        "nighttemp": str(lo),
                        "daywind": "东",
                        "nightwind": "东",
                        "daypower": "1-3",
                        "nightpower": "1-3",
                    }
                    for i, (d, n, hi, lo) in enumerate(days)
                ]
                forecast = {
                    "city": f"{city}市",
                    "adcode": CITIES[city][0],
                    "province": city,
                    "reporttime": "2026-12-02 09:00:00",
                    "casts": casts,
                }
                return 200, {"status": "1", "count": "1", "info": "OK", "infocode": "10000", "forecasts": [forecast]}
            live = {
                "province": city,
                "city": f"{city}市",
                "adcode": CITIES[city][0],
                "weather": now,
                "temperature": str(temp),
                "winddirection": "东北",
                "windpower": "≤3",
                "humidity": "60",
                "reporttime": "2026-12-02 09:00:00",
            }
            return 200, {"status": "1", "count": "1", "info": "OK", "infocode": "10000", "lives": [live]}
        return 200, {"status": "0", "info": "UNKNOWN_PATH", "infocode": "20003"}

    def _qweather(self, path: str, q: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        if headers.get("x-qw-api-key") != QWEATHER_KEY:
            return 401, {
                "error": {
                    "status": 401,
                    "type": "https://dev.qweather.com/docs/resource/error-code/#unauthorized",
                    "title": "Unauthorized",
                }
            }
        if path == "/geo/v2/city/lookup":
            city = _city_of(q.get("location", ""))
            if city is None:
                return 200, {"code": "404"}
            return 200, {
                "code": "200",
                "location": [{"name": city, "id": CITIES[city][1], "adm1": city, "country": "中国"}],
            }
        city = next((c for c, v in CITIES.items() if v[1] == q.get("location")), None)
        if city is None:
            return 200, {"code": "400"}
        _, _, now, temp, days = CITIES[city]
        if path == "/v7/weather/now":
            return 200, {
                "code": "200",
                "updateTime": "2026-12-02T09:00+08:00",
                "now": {
                    "obsTime": "2026-12-02T08:50+08:00",
                    "temp": str(temp),
                    "feelsLike": str(temp),
                    "text": now,
                    "windDir": "东北风",
                    "windScale": "2",
                    "humidity": "60",
                },
            }
        if path == "/v7/weather/3d":
            daily = [
                {"fxDate": f"2026-12-0{2 + i}", "tempMax": str(hi), "tempMin": str(lo), "textDay": d, "textNight": n}
                for i, (d, n, hi, lo) in enumerate(days)
            ]
            return 200, {"code": "200", "daily": daily}
        return 404, {"code": "404"}


if __name__ == "__main__":
    fake = FakeTools(port=0).start()
    print(f"fake tool providers on {fake.base_url}", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        fake.stop()
