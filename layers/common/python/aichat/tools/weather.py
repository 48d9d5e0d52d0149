"""get_weather: live conditions and a short forecast from AMap (高德, the default) or QWeather (和风)."""

from __future__ import annotations

import threading
import time
from typing import Any

from .base import ToolError, ToolResult
from .http import JsonClient

# A city's code does not change: lookups are cached for a day (and a bounded number of cities).
GEO_CACHE_S = 86_400.0
GEO_CACHE_MAX = 2048


class _GeoCache:
    """city name -> provider location code, with a TTL and a size bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, tuple[str, str]]] = {}

    def get(self, key: str) -> tuple[str, str] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            return entry[1]

    def put(self, key: str, value: tuple[str, str]) -> None:
        with self._lock:
            if len(self._entries) >= GEO_CACHE_MAX:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (time.monotonic() + GEO_CACHE_S, value)


class AmapWeather:
    """AMap's web service: /v3/geocode/geo for the adcode, /v3/weather/weatherInfo for the weather.

    AMap answers HTTP 200 for its own errors: `status` "1" is success, "0" a failure with `info`/`infocode`.
    """

    provider = "amap"

    def __init__(self, client: JsonClient, key: str) -> None:
        self.client = client
        self.key = key
        self.cache = _GeoCache()

    def _call(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        body = self.client.get(path, params={"key": self.key, "output": "JSON", **params})
        if not isinstance(body, dict) or str(body.get("status")) != "1":
            info = body.get("info") if isinstance(body, dict) else None
            raise ToolError(f"高德天气服务返回错误：{info or '未知错误'}")
        return body

    def _adcode(self, city: str) -> tuple[str, str]:
        cached = self.cache.get(city)
        if cached:
            return cached
        body = self._call("/v3/geocode/geo", {"address": city})
        geocodes = body.get("geocodes") or []
        first = geocodes[0] if isinstance(geocodes, list) and geocodes and isinstance(geocodes[0], dict) else None
        adcode = first.get("adcode") if first else None
        if not isinstance(adcode, str) or not adcode.isdigit():
            raise ToolError(f"找不到城市：{city}", display=f"找不到城市「{city}」")
        name = first.get("city") if isinstance(first.get("city"), str) and first.get("city") else city
        found = (adcode, str(name))
        self.cache.put(city, found)
        return found

    def weather(self, city: str) -> ToolResult:
        adcode, name = self._adcode(city)
        live_body = self._call("/v3/weather/weatherInfo", {"city": adcode, "extensions": "base"})
        lives = live_body.get("lives") or []
        live = lives[0] if isinstance(lives, list) and lives and isinstance(lives[0], dict) else None
        if live is None:
            raise ToolError(f"高德没有 {city} 的实况天气")
        forecast_body = self._call("/v3/weather/weatherInfo", {"city": adcode, "extensions": "all"})
        forecasts = forecast_body.get("forecasts") or []
        casts = forecasts[0].get("casts", []) if forecasts and isinstance(forecasts[0], dict) else []
        data = {
            "city": live.get("city") or name,
            "now": {
                "weather": live.get("weather"),
                "temperature_c": _number(live.get("temperature")),
                "humidity_pct": _number(live.get("humidity")),
                "wind": f"{live.get('winddirection', '')}风 {live.get('windpower', '')}级".strip(),
                "report_time": live.get("reporttime"),
            },
            "forecast": [
                {
                    "date": cast.get("date"),
                    "day_weather": cast.get("dayweather"),
                    "night_weather": cast.get("nightweather"),
                    "high_c": _number(cast.get("daytemp")),
                    "low_c": _number(cast.get("nighttemp")),
                }
                for cast in casts[:4]
                if isinstance(cast, dict)
            ],
            "source": "高德天气",
        }
        return ToolResult(data, _display(data))


class QWeather:
    """QWeather: /geo/v2/city/lookup for the LocationID, /v7/weather/now and /v7/weather/3d.

    Each developer has an API host of their own (the base URL); the key goes in `X-QW-Api-Key`. Errors come
    as HTTP statuses, and a 200 may still carry an error `code` (anything but "200").
    """

    provider = "qweather"

    def __init__(self, client: JsonClient, key: str) -> None:
        self.client = client
        self.key = key
        self.cache = _GeoCache()

    def _call(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        body = self.client.get(path, params=params, headers={"X-QW-Api-Key": self.key})
        if not isinstance(body, dict) or str(body.get("code")) != "200":
            code = body.get("code") if isinstance(body, dict) else None
            raise ToolError(f"和风天气返回错误码 {code}")
        return body

    def _location(self, city: str) -> tuple[str, str]:
        cached = self.cache.get(city)
        if cached:
            return cached
        body = self._call("/geo/v2/city/lookup", {"location": city, "range": "cn", "number": 1})
        locations = body.get("location") or []
        first = locations[0] if isinstance(locations, list) and locations and isinstance(locations[0], dict) else None
        if first is None or not isinstance(first.get("id"), str):
            raise ToolError(f"找不到城市：{city}", display=f"找不到城市「{city}」")
        found = (first["id"], str(first.get("name") or city))
        self.cache.put(city, found)
        return found

    def weather(self, city: str) -> ToolResult:
        location, name = self._location(city)
        now = self._call("/v7/weather/now", {"location": location}).get("now") or {}
        daily = self._call("/v7/weather/3d", {"location": location}).get("daily") or []
        data = {
            "city": name,
            "now": {
                "weather": now.get("text"),
                "temperature_c": _number(now.get("temp")),
                "humidity_pct": _number(now.get("humidity")),
                "wind": f"{now.get('windDir', '')} {now.get('windScale', '')}级".strip(),
                "report_time": now.get("obsTime"),
            },
            "forecast": [
                {
                    "date": day.get("fxDate"),
                    "day_weather": day.get("textDay"),
                    "night_weather": day.get("textNight"),
                    "high_c": _number(day.get("tempMax")),
                    "low_c": _number(day.get("tempMin")),
                }
                for day in daily[:4]
                if isinstance(day, dict)
            ],
            "source": "和风天气",
        }
        return ToolResult(data, _display(data))


def _number(value: Any) -> float | int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else number


def _display(data: dict[str, Any]) -> str:
    now = data["now"]
    temp = f" {now['temperature_c']}°C" if now.get("temperature_c") is not None else ""
    return f"{data['city']} {now.get('weather') or ''}{temp}".strip()
