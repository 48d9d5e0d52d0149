"""DashScope text-to-speech over its native HTTP API: Qwen-TTS and CosyVoice (non-streaming calls).

Both answer `output.audio.url`, a WAV that expires after 24 h, which is fetched at once (it is never handed
to a client). Errors follow the contract: the provider refusing → 502 UpstreamHTTPError, unreachable or
too slow → 502 NetworkError; nothing is cached then.
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ApiError

if TYPE_CHECKING:
    import requests

log = logging.getLogger("aichat.voice")

MAX_AUDIO_BYTES = 32 * 1024 * 1024
# Per request, counting a CJK character as 2 (the providers' documented rule).
LIMITS = {"qwen": 600, "cosyvoice": 2000}
DEFAULT_MODELS = {"qwen": "qwen3-tts-flash", "cosyvoice": "cosyvoice-v3-flash"}
SAMPLE_RATE = 24_000


class TtsClient:
    """One provider's synthesis call: text and voice in, WAV bytes out."""

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        api_key: str,
        model: str,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model or DEFAULT_MODELS[provider]
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.limit = LIMITS[provider]
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    def _client(self) -> requests.Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    import requests

                    self._session = requests.Session()
        return self._session

    def _request(self, text: str, voice: str) -> tuple[str, dict[str, Any]]:
        if self.provider == "qwen":
            path = "/services/aigc/multimodal-generation/generation"
            return path, {"model": self.model, "input": {"text": text, "voice": voice, "language_type": "Chinese"}}
        path = "/services/audio/tts/SpeechSynthesizer"
        body = {
            "model": self.model,
            "input": {"text": text, "voice": voice, "format": "wav", "sample_rate": SAMPLE_RATE},
        }
        return path, body

    def synthesize(self, text: str, voice: str) -> bytes:
        """The WAV of `text` in `voice` (one request; `text` within the provider's limit)."""
        import requests

        path, body = self._request(text, voice)
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        try:
            resp = self._client().post(self.base_url + path, json=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ApiError("NetworkError", "语音服务连接失败") from exc
        if resp.status_code != 200:
            code = _error_code(resp)
            log.warning("tts refused", extra={"status": resp.status_code, "code": code, "provider": self.provider})
            raise ApiError("UpstreamHTTPError", f"语音服务返回错误：{code or resp.status_code}")
        try:
            audio = resp.json()["output"]["audio"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError("UpstreamHTTPError", "语音服务返回的数据无法解析") from exc
        if isinstance(audio.get("data"), str) and audio["data"]:
            return base64.b64decode(audio["data"])
        url = audio.get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ApiError("UpstreamHTTPError", "语音服务没有返回音频")
        return self._download(url)

    def _download(self, url: str) -> bytes:
        import requests

        try:
            with self._client().get(url, timeout=self.timeout, stream=True) as resp:
                if resp.status_code != 200:
                    raise ApiError("UpstreamHTTPError", f"语音文件下载失败：HTTP {resp.status_code}")
                data = resp.raw.read(MAX_AUDIO_BYTES + 1, decode_content=True)
        except ApiError:
            raise
        except (requests.RequestException, OSError) as exc:
            raise ApiError("NetworkError", "语音文件下载失败") from exc
        except Exception as exc:  # urllib3's read errors on a cut connection
            raise ApiError("NetworkError", "语音文件下载失败") from exc
        if len(data) > MAX_AUDIO_BYTES:
            raise ApiError("UpstreamHTTPError", "语音文件过大")
        return data


def _error_code(resp: Any) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return str(body.get("code")) if isinstance(body, dict) and body.get("code") else None
