"""Time to audio for a 200-character reply: the first request (synthesis, download, MP3 encoding, store)
vs the cached one, on one ChatService under gunicorn, in one run.

The TTS provider is dev/fake_tts.py in this process (a tone per character; `--tts-latency` adds a
provider delay per call, since the real one cannot be measured offline), so the figures are our own cost
around the provider: what a user waits beyond DashScope's own synthesis time, and what a replay costs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import benchlib
from benchlib import BenchDB, chat_env, http_get, median, ms, pct, show, start_chat, temp_dir

from dev.fake_tts import FakeTts

SENTENCES = ("今天的风有一点凉，记得多穿一件衣服。", "喵～我一直在这里陪着你哦！", "要不要一起听听雨声？")


def reply_text(seed: int, chars: int = 200) -> str:
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += rng.choice(SENTENCES)
    return text[: chars - 1] + "。"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=30, help="distinct replies (each: one first, one cached)")
    parser.add_argument("--tts-latency", type=float, default=0.0, help="seconds the fake provider waits per call")
    parser.add_argument("--quick", action="store_true", help="10 replies")
    args = parser.parse_args(argv)
    replies = 10 if args.quick else args.replies
    with temp_dir("aichat-bench-voice-") as tmp:
        db = BenchDB("sqlite", tmp)
        tts = FakeTts(api_key="bench-llm-key").start()
        if args.tts_latency:
            tts.fail(status=0, delay=args.tts_latency)
        try:
            (user,) = db.create_users(1)
            now = int(time.time() * 1000)
            texts = [reply_text(i) for i in range(replies)]
            db.insert_messages((user.uid, "naitang", "assistant", t, 0, 0, now + i) for i, t in enumerate(texts))
            ids = [row[0] for row in db.query("SELECT id FROM messages ORDER BY id")]
            env = chat_env(
                db.url,
                "http://127.0.0.1:9",  # no model is called
                AICHAT_DASHSCOPE_BASE_URL=tts.base_url,
                AICHAT_AUDIO_DIR=str(tmp / "audio"),
                AICHAT_VOICE_PER_MINUTE="100000",
                AICHAT_VOICE_CHARS_PER_DAY="100000000",
            )
            server = start_chat(env, tmp)
            try:
                port = int(server.base_url.rsplit(":", 1)[1])
                headers = user.auth
                first, cached, sizes = [], [], []
                http_get(port, f"/chat/voice?message_id={ids[0]}", headers)  # warm-up: imports, connections
                for message_id in ids[1:]:
                    began = time.perf_counter()
                    status, body = http_get(port, f"/chat/voice?message_id={message_id}", headers)
                    first.append(time.perf_counter() - began)
                    assert status == 200, body[:200]
                    began = time.perf_counter()
                    status, again = http_get(port, f"/chat/voice?message_id={message_id}", headers)
                    cached.append(time.perf_counter() - began)
                    assert status == 200 and again == body
                    sizes.append(len(body))
            finally:
                server.stop()
        finally:
            tts.stop()
            db.close()
    rows = [
        ("first request (synthesis)", ms(median(first)), ms(pct(first, 90)), ms(pct(first, 99))),
        ("cached", ms(median(cached)), ms(pct(cached, 90)), ms(pct(cached, 99))),
    ]
    show(
        f"Time to audio, 200-character reply, {len(first)} replies (SQLite, fake TTS +{args.tts_latency:.2f} s)",
        ("request", "p50", "p90", "p99"),
        rows,
    )
    seconds = 199 * 0.06
    benchlib.note(
        f"first / cached (p50): {median(first) / median(cached):.1f}x; provider calls per reply: "
        f"{tts.synth_count() / replies:.0f} (weight 400 ≤ the 600 limit); MP3 {median(sizes) / 1024:.1f} KiB"
        f" for {seconds:.1f} s of audio ({median(sizes) * 8 / seconds / 1000:.0f} kbit/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
