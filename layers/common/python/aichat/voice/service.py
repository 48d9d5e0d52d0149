"""GET /chat/voice: a stored reply in its role's voice, synthesised once and served from the store after."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import ApiError
from ..fc import Credentials
from ..store import Database, now_ms
from . import audio, clips, text
from .tts import DEFAULT_MODELS, TtsClient

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .store import LocalStore, OssStore

log = logging.getLogger("aichat.voice")

DEFAULT_VOICES = {"qwen": "Cherry", "cosyvoice": "longanyang"}
# A clip another request is making is waited for this long; one pending longer than STALE_MS lost its maker.
WAIT_S = 60.0
STALE_MS = 120_000


def build_store(settings: Settings) -> LocalStore | OssStore:
    """The audio store the settings name."""
    from .store import LocalStore, OssStore

    if settings.audio_store == "oss":
        from .oss import OssClient

        client = OssClient(endpoint=settings.oss_endpoint, bucket=settings.oss_bucket, region=settings.oss_region)
        return OssStore(client, settings.oss_prefix, settings.oss_url_ttl_s)
    return LocalStore(settings.audio_dir)


def env_credentials(settings: Settings) -> Credentials | None:
    """The role's credentials from the environment (FC sets them at start; a request's headers are fresher)."""
    if not settings.alibaba_access_key_id:
        return None
    return Credentials(
        settings.alibaba_access_key_id, settings.alibaba_access_key_secret, settings.alibaba_security_token or None
    )


class Voice:
    """Synthesis, the cache of clips, the voice limits, and what clears the cache."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        roles: Any,
        *,
        tts: TtsClient | None = None,
        store: LocalStore | OssStore | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.roles = roles
        self.tts = tts or TtsClient(
            provider=settings.tts_provider,
            base_url=settings.dashscope_base_url,
            api_key=settings.llm_api_key,
            model=settings.tts_model or DEFAULT_MODELS[settings.tts_provider],
            connect_timeout_s=settings.tts_connect_timeout_s,
            read_timeout_s=settings.tts_read_timeout_s,
        )
        self._store = store
        self._pool: ThreadPoolExecutor | None = None

    @property
    def store(self) -> LocalStore | OssStore:
        """The audio store, built on first use (its modules stay out of the cold start)."""
        if self._store is None:
            self._store = build_store(self.settings)
        return self._store

    # -- the operation --------------------------------------------------------------------------------
    def clip(self, uid: str, message_id: int, creds: Credentials | None) -> tuple[str, Any]:
        """("bytes", (mp3, etag)) for a local store, ("redirect", url) for OSS; raises ApiError otherwise."""
        from ..chat import messages

        row = self.db.read(lambda tx: messages.get(tx, uid=uid, message_id=message_id))
        if row is None:
            raise ApiError("MessageNotFound")
        if row["sender_role"] != "assistant":
            raise ApiError("InvalidInput", "只能朗读角色的回复")
        spoken = text.speakable(row["content"])
        if not spoken:
            raise ApiError("InvalidInput", "这条回复没有可以朗读的文字")
        voice = self._voice(row["role_code"])
        digest = hashlib.sha256(f"{self.tts.provider}|{self.tts.model}|{voice}|{spoken}".encode()).hexdigest()[:32]
        key = f"{uid}/{message_id}-{digest[:16]}.mp3"
        creds = creds or env_credentials(self.settings)
        if self.store.kind == "oss" and creds is None:
            raise ApiError("InternalError", "音频存储没有可用的凭证")
        for _ in range(2):  # a second round when the clip we waited for was given up by its maker
            made = self._made_or_claimed(uid, message_id, voice, digest, key, chars=len(spoken))
            if made == "ready":
                served = self._serve(key, digest, creds)
                if served is not None:
                    return served
                continue  # the file is gone (a local store on a new instance): made again
            if made == "claimed":
                return self._make(uid, message_id, voice, digest, key, spoken, creds)
            if self._wait(message_id, voice, digest):
                served = self._serve(key, digest, creds)
                if served is not None:
                    return served
        raise ApiError("UpstreamHTTPError", "语音生成失败，请稍后再试")

    def _voice(self, role_code: str) -> str:
        role = next((r for r in self.roles.enabled() if r.role_code == role_code), None)
        provider = self.settings.tts_provider
        chosen = role.voice_for(provider) if role is not None else None
        return chosen or self.settings.tts_default_voice or DEFAULT_VOICES[provider]

    def _made_or_claimed(self, uid: str, message_id: int, voice: str, digest: str, key: str, *, chars: int) -> str:
        """Count the request against the user's limits and claim the clip if nobody has: "ready",
        "claimed" (ours to make), or "pending" (another request is making it)."""
        s = self.settings
        with self.db.tx() as tx:
            if tx.one("SELECT uid FROM users WHERE uid = ?" + tx.for_update, (uid,)) is None:
                raise ApiError("Unauthorized")
            now = now_ms()
            used = clips.usage(tx, uid=uid, now=now) or {}
            if (used.get("minute_n") or 0) >= s.voice_per_minute:
                retry = _seconds((used["minute_oldest"] or now) + clips.MINUTE_MS - now)
                raise ApiError("RateLimited", "朗读请求太频繁，请稍后再试", retry_after=retry)
            clip = clips.find(tx, message_id=message_id, voice=voice, text_hash=digest)
            if clip is not None and clip["status"] == "ready":
                clips.count(tx, uid=uid, chars=0, now=now)
                return "ready"
            if clip is not None and not clips.take_over(tx, clip_id=clip["id"], stale_before=now - STALE_MS):
                clips.count(tx, uid=uid, chars=0, now=now)
                return "pending"
            if (used.get("day_chars") or 0) + chars > s.voice_chars_per_day:
                retry = _seconds((used.get("day_oldest") or now) + clips.DAY_MS - now)
                raise ApiError("RateLimited", "今天的朗读字数已用完，明天再来吧", retry_after=retry)
            if clip is None and not clips.claim(
                tx, uid=uid, message_id=message_id, voice=voice, text_hash=digest, store_key=key
            ):
                clips.count(tx, uid=uid, chars=0, now=now)
                return "pending"  # another request claimed it a moment ago
            clips.count(tx, uid=uid, chars=chars, now=now)
            return "claimed"

    def _make(
        self, uid: str, message_id: int, voice: str, digest: str, key: str, spoken: str, creds: Credentials | None
    ) -> tuple[str, Any]:
        started = time.monotonic()
        try:
            pieces = text.split(spoken, self.tts.limit)
            if len(pieces) == 1:
                wavs = [self.tts.synthesize(pieces[0], voice)]
            else:
                wavs = list(self._executor().map(lambda piece: self.tts.synthesize(piece, voice), pieces))
            mp3 = audio.join_to_mp3(wavs)
            self.store.put(key, mp3, audio.CONTENT_TYPE, creds)  # type: ignore[arg-type]
        except BaseException:
            with self.db.tx() as tx:
                clip = clips.find(tx, message_id=message_id, voice=voice, text_hash=digest)
                if clip is not None:
                    clips.drop(tx, clip_id=clip["id"])  # nothing cached: the next request tries again
            raise
        with self.db.tx() as tx:
            clip = clips.find(tx, message_id=message_id, voice=voice, text_hash=digest)
            if clip is not None:
                clips.ready(tx, clip_id=clip["id"], size=len(mp3))
        log.info(
            "voice synthesised",
            extra={
                "uid": uid,
                "message_id": message_id,
                "pieces": len(pieces),
                "chars": len(spoken),
                "bytes": len(mp3),
                "ms": int((time.monotonic() - started) * 1000),
            },
        )
        if self.store.kind == "oss":
            return "redirect", self.store.url(key, creds)  # type: ignore[arg-type]
        return "bytes", (mp3, digest)

    def _wait(self, message_id: int, voice: str, digest: str) -> bool:
        """Wait for another request's clip: True once ready, False if it was given up (or took too long)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            clip = self.db.read(lambda tx: clips.find(tx, message_id=message_id, voice=voice, text_hash=digest))
            if clip is None:
                return False
            if clip["status"] == "ready":
                return True
        return False

    def _serve(self, key: str, digest: str, creds: Credentials | None) -> tuple[str, Any] | None:
        if self.store.kind == "oss":
            return "redirect", self.store.url(key, creds)  # type: ignore[arg-type]
        data = self.store.read(key)
        if data is None:
            with self.db.tx() as tx:
                tx.execute("DELETE FROM voice_clips WHERE store_key = ?", (key,))
            return None
        return "bytes", (data, digest)

    def _executor(self) -> ThreadPoolExecutor:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.settings.tts_parallel, thread_name_prefix="tts")
        return self._pool

    # -- what removes audio -----------------------------------------------------------------------------
    def forget_removed(self, uid: str, creds: Credentials | None = None) -> int:
        """Remove the audio of the user's messages that are gone (after a delete, clear or regenerate)."""
        try:
            gone = self.db.read(lambda tx: clips.orphans(tx, uid=uid))
            if not gone:
                return 0
            self._remove(gone, creds)
            return len(gone)
        except Exception:  # a cache clean-up never fails the operation that triggered it
            log.exception("could not remove the audio of removed messages", extra={"uid": uid})
            return 0

    def _remove(self, rows: list[Any], creds: Credentials | None) -> None:
        creds = creds or env_credentials(self.settings)
        for row in rows:
            self.store.delete(row["store_key"], creds)  # type: ignore[arg-type]
        with self.db.tx() as tx:
            clips.delete_ids(tx, ids=[int(row["id"]) for row in rows])


def eraser(settings: Settings) -> Any:
    """Account deletion's part: the user's clips (rows and stored audio) and voice counters."""

    def erase(tx: Any, *, uid: str) -> int:
        rows = clips.of_user(tx, uid=uid)
        if rows:
            store = build_store(settings)
            creds = env_credentials(settings)
            for row in rows:
                try:
                    store.delete(row["store_key"], creds)  # type: ignore[arg-type]
                except Exception:  # the row goes anyway: nothing can serve it after the account is gone
                    log.exception("could not delete a voice clip of a deleted account")
            clips.delete_ids(tx, ids=[int(row["id"]) for row in rows])
        clips.delete_events(tx, uid=uid)
        return 0  # the erasers' sum counts messages

    return erase


def _seconds(ms: float) -> int:
    return max(1, math.ceil(ms / 1000))
