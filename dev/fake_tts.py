"""A loopback fake of DashScope's text-to-speech HTTP API (Qwen-TTS and CosyVoice); never shipped.

`POST /api/v1/services/aigc/multimodal-generation/generation` (Qwen-TTS) and
`POST /api/v1/services/audio/tts/SpeechSynthesizer` (CosyVoice) answer as DashScope does for a
non-streaming call: `{"request_id", "output": {"finish_reason": "stop", "audio": {"url", "id",
"expires_at"}}, "usage": {"characters": N}}`, with the Bearer key checked and the provider's input limit
enforced (a CJK character counts 2; over the limit → 400 `InvalidParameter`). The URL serves a real
24 kHz mono 16-bit WAV: a short tone per character (its pitch from the character), so `make run` plays
something offline and tests can check one piece's length against its text.

Tests script faults with `fail(status=…, body=…, delay=…, times=…)` and read `requests` (the JSON bodies).
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import threading
import time
import unicodedata
import uuid
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RATE = 24_000
TONE_S = 0.06
LIMITS = {"qwen": 600, "cosyvoice": 2000}
PATHS = {
    "/api/v1/services/aigc/multimodal-generation/generation": "qwen",
    "/api/v1/services/audio/tts/SpeechSynthesizer": "cosyvoice",
}


def weight(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


@functools.lru_cache(maxsize=4096)
def _tone(freq: int) -> bytes:
    per = int(RATE * TONE_S)
    samples = (
        int(8000 * min(1.0, i / 120, (per - i) / 120) * math.sin(2 * math.pi * freq * i / RATE)) for i in range(per)
    )
    return struct.pack(f"<{per}h", *samples)


def tone_wav(text: str) -> bytes:
    """A WAV with one 60 ms tone per character (pitch 300–800 Hz by the character's code)."""
    frames = b"".join(_tone(300 + ord(ch) % 500) for ch in text)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(bytes(frames))
    return out.getvalue()


class FakeTts:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> None:
        self.host, self.port, self.api_key = host, port, api_key
        self.requests: list[dict[str, Any]] = []
        self.downloads = 0
        self._audio: dict[str, bytes] = {}
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> FakeTts:
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
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        """What AICHAT_DASHSCOPE_BASE_URL is set to."""
        return f"http://{self.host}:{self.port}/api/v1"

    def fail(
        self,
        *,
        status: int = 500,
        body: Any = None,
        delay: float = 0.0,
        times: int | None = None,
        download: bool = False,
    ) -> None:
        """The next synthesis calls (or audio downloads) answer `status` with `body` after `delay` (status 0:
        the normal answer, after the delay); `times` bounds how many (None: all)."""
        with self._lock:
            self._faults.append({"status": status, "body": body, "delay": delay, "times": times, "download": download})

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self.downloads = 0

    def synth_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def _fault(self, download: bool) -> dict[str, Any] | None:
        with self._lock:
            for fault in self._faults:
                if fault["download"] == download and fault["times"] != 0:
                    if fault["times"] is not None:
                        fault["times"] -= 1
                    return dict(fault)
        return None


class _Handler(BaseHTTPRequestHandler):
    owner: FakeTts
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _pause(self, fault: dict[str, Any] | None) -> None:
        if fault and fault["delay"]:
            time.sleep(fault["delay"])

    def do_POST(self) -> None:
        provider = PATHS.get(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if provider is None:
            return self._send(404, {"code": "NotFound", "message": "no such path"})
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(400, {"code": "InvalidParameter", "message": "body is not JSON"})
        with self.owner._lock:
            self.owner.requests.append(
                {"provider": provider, "body": body, "authorization": self.headers.get("Authorization")}
            )
        fault = self.owner._fault(download=False)
        self._pause(fault)
        if fault and fault["status"]:  # status 0: only the delay
            return self._send(fault["status"], fault["body"] or {"code": "InternalError", "message": "fake fault"})
        key = self.owner.api_key
        if not (self.headers.get("Authorization") or "").startswith("Bearer ") or (
            key and self.headers.get("Authorization") != f"Bearer {key}"
        ):
            return self._send(401, {"code": "InvalidApiKey", "message": "Invalid API-key provided."})
        text = (body.get("input") or {}).get("text")
        voice = (body.get("input") or {}).get("voice")
        if not isinstance(text, str) or not text or not voice:
            return self._send(400, {"code": "InvalidParameter", "message": "input.text and input.voice are required"})
        if weight(text) > LIMITS[provider]:
            return self._send(
                400, {"code": "InvalidParameter", "message": f"Range of input length should be [0, {LIMITS[provider]}]"}
            )
        audio_id = uuid.uuid4().hex
        with self.owner._lock:
            self.owner._audio[audio_id] = tone_wav(text)
        url = f"http://{self.owner.host}:{self.owner.port}/audio/{audio_id}.wav"
        self._send(
            200,
            {
                "request_id": uuid.uuid4().hex,
                "output": {
                    "finish_reason": "stop",
                    "audio": {"url": url, "id": audio_id, "expires_at": int(time.time()) + 86_400, "data": ""},
                },
                "usage": {"characters": weight(text)},
            },
        )

    def do_GET(self) -> None:
        if not self.path.startswith("/audio/"):
            return self._send(404, b"not found", "text/plain")
        fault = self.owner._fault(download=True)
        self._pause(fault)
        if fault and fault["status"]:
            return self._send(fault["status"], b"<Error>AccessDenied</Error>", "application/xml")
        audio_id = self.path.rsplit("/", 1)[-1].removesuffix(".wav")
        with self.owner._lock:
            data = self.owner._audio.get(audio_id)
            self.owner.downloads += 1
        if data is None:
            return self._send(404, b"<Error>NoSuchKey</Error>", "application/xml")
        self._send(200, data, "audio/wav")
