"""Voice: GET /chat/voice reads a stored reply aloud in its role's voice, through DashScope TTS (a loopback
fake speaking its wire format), cached once per (message, voice, text) in a local dir or OSS (a fake that
checks V4 signatures)."""

from __future__ import annotations

import io
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from aichat.voice import audio
from aichat.voice.text import speakable, split, weight

from dev.fake_oss import FakeOss
from dev.fake_tts import TONE_S
from tests.conftest import chat_env
from tests.helpers import AppClient, Client, assert_error, history, query

CAT_REPLY = "喵～（蹭蹭你）今天也要**开心**哦！😺"
CAT_SPOKEN = "喵～今天也要开心哦！"


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory, db_url) -> Path:
    """The voice server's local store, one per backend (message ids of the two databases overlap)."""
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="session")
def voice_server(start_server, db_url, fake_llm_server, fake_tts_server, audio_dir):
    env = chat_env(
        fake_llm_server,
        db_url,
        AICHAT_DASHSCOPE_BASE_URL=fake_tts_server.base_url,
        AICHAT_AUDIO_DIR=str(audio_dir),
        AICHAT_TTS_TIMEOUT="2",
        AICHAT_VOICE_PER_MINUTE="1000",
    )
    return start_server("chat", **env)


@pytest.fixture
def vuser(voice_server, new_user, fake_llm, fake_tts) -> Client:
    return Client(voice_server.base_url, token=new_user()[1])


def reply_of(client: Client, text: str, role_code: str = "naitang", fake_llm=None) -> int:
    """Have the role say `text` (scripted) and return the stored reply's id."""
    fake_llm.enqueue(text=text)
    res = client.post("/chat/send", {"role_code": role_code, "message": "说点什么"})
    assert res.status_code == 200, res.text
    return res.json()["message"]["id"]


def mp3_frames(data: bytes) -> list[tuple[int, int, int, str]]:
    """Walk the MP3's frame headers: (MPEG version id, layer, sample rate, channel mode) of each frame.

    Fails on anything that is not a run of valid MPEG audio frames from the first byte to the last."""
    rates = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
    bitrates_v2_l3 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
    frames, at = [], 0
    while at < len(data):
        b1, b2, b3 = data[at + 1], data[at + 2], data[at + 3]
        assert data[at] == 0xFF and b1 & 0xE0 == 0xE0, f"no frame sync at byte {at}"
        version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
        assert version == 2 and layer == 1, "MPEG-2 layer III expected (24 kHz speech)"
        bitrate = bitrates_v2_l3[b2 >> 4] * 1000
        rate = rates[version][(b2 >> 2) & 3]
        padding = (b2 >> 1) & 1
        mode = ("stereo", "joint", "dual", "mono")[b3 >> 6]
        frames.append((version, layer, rate, mode))
        at += 72 * bitrate // rate + padding  # MPEG-2 layer III frame length
    assert at == len(data)
    return frames


# -- what is spoken -----------------------------------------------------------------------------------


def test_text_cleaning_rule():
    assert speakable(CAT_REPLY) == CAT_SPOKEN
    assert speakable("(smiles) Hi [wink] there, see [the docs](https://x.io/a) 👋🏽") == "Hi there, see the docs"
    assert speakable("【动作：摇尾巴】汪！\n\n- 第一\n- 第二\n# 标题\n`代码`") == "汪！\n第一\n第二\n标题\n代码"
    assert speakable("（她笑着（小声）说）嗯") == "嗯"
    assert speakable("（蹭蹭）😺") == ""


def test_long_text_is_split_at_sentence_ends_within_the_limit():
    sentence = "今天的风有一点凉，记得多穿一件衣服。"  # 18 characters, weight 36
    text = sentence * 40
    pieces = split(text, 600)
    assert "".join(pieces) == text and len(pieces) == 3
    assert all(weight(p) <= 600 and p.endswith("。") for p in pieces)
    no_breaks = "啊" * 700
    assert [weight(p) for p in split(no_breaks, 600)] == [600, 600, 200]


# -- the operation ------------------------------------------------------------------------------------


def test_a_reply_is_read_aloud_as_mp3_in_its_roles_voice(vuser, fake_llm, fake_tts, audio_dir):
    message_id = reply_of(vuser, CAT_REPLY, fake_llm=fake_llm)
    res = vuser.get("/chat/voice", params={"message_id": message_id})
    assert res.status_code == 200, res.text
    assert res.headers["Content-Type"] == "audio/mpeg" and int(res.headers["Content-Length"]) == len(res.content)
    assert res.headers["Accept-Ranges"] == "bytes" and res.headers["ETag"]
    frames = mp3_frames(res.content)
    assert {f[2:] for f in frames} == {(24000, "mono")}
    duration = len(frames) * 576 / 24000
    assert abs(duration - len(CAT_SPOKEN) * TONE_S) < 0.2  # one tone per spoken character
    (call,) = fake_tts.requests
    assert call["provider"] == "qwen" and call["authorization"] == "Bearer test-llm-key"
    assert call["body"] == {
        "model": "qwen3-tts-flash",
        "input": {"text": CAT_SPOKEN, "voice": "Cherry", "language_type": "Chinese"},
    }
    assert list(audio_dir.rglob("*.mp3"))  # kept in the local store


def test_the_second_request_is_served_from_the_store(vuser, fake_llm, fake_tts):
    message_id = reply_of(vuser, "第二次就不用再合成了。", fake_llm=fake_llm)
    first = vuser.get("/chat/voice", params={"message_id": message_id})
    second = vuser.get("/chat/voice", params={"message_id": message_id})
    assert second.content == first.content and fake_tts.synth_count() == 1
    etag = first.headers["ETag"]
    assert (
        vuser.get("/chat/voice", params={"message_id": message_id}, headers={"If-None-Match": etag}).status_code == 304
    )
    part = vuser.get("/chat/voice", params={"message_id": message_id}, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == first.content[:100]
    assert part.headers["Content-Range"] == f"bytes 0-99/{len(first.content)}"
    tail = vuser.get("/chat/voice", params={"message_id": message_id}, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == first.content[-10:]
    bad = vuser.get("/chat/voice", params={"message_id": message_id}, headers={"Range": f"bytes={10**9}-"})
    assert bad.status_code == 416 and bad.json()["success"] is False
    assert fake_tts.synth_count() == 1


def test_two_concurrent_first_requests_make_one_call(vuser, fake_llm, fake_tts):
    message_id = reply_of(vuser, "两个人同时点了播放。", fake_llm=fake_llm)
    fake_tts.fail(status=0, delay=0.8)  # every call slowed down, so the two requests overlap
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: vuser.get("/chat/voice", params={"message_id": message_id}), range(2)))
    assert [r.status_code for r in results] == [200, 200]
    assert results[0].content == results[1].content and fake_tts.synth_count() == 1


def test_only_the_owners_assistant_messages_are_read(vuser, voice_server, new_user, fake_llm, fake_tts):
    message_id = reply_of(vuser, "这是我的回复。", fake_llm=fake_llm)
    other = Client(voice_server.base_url, token=new_user()[1])
    assert_error(other.get("/chat/voice", params={"message_id": message_id}), 404, "MessageNotFound")
    user_message = history(vuser)[-2]
    assert user_message["sender_role"] == "user"
    assert_error(vuser.get("/chat/voice", params={"message_id": user_message["id"]}), 400, "InvalidInput")
    assert_error(vuser.get("/chat/voice", params={"message_id": 10**12}), 404, "MessageNotFound")
    assert_error(vuser.get("/chat/voice"), 400, "InvalidInput")
    assert_error(vuser.get("/chat/voice", params={"message_id": "abc"}), 400, "InvalidInput")
    assert_error(
        Client(voice_server.base_url).get("/chat/voice", params={"message_id": message_id}), 401, "Unauthorized"
    )
    silent = reply_of(vuser, "（摇尾巴）😺", fake_llm=fake_llm)
    assert_error(vuser.get("/chat/voice", params={"message_id": silent}), 400, "InvalidInput")
    assert fake_tts.synth_count() == 0


def test_a_long_reply_is_synthesised_in_pieces_and_joined(vuser, fake_llm, fake_tts):
    text = "今天的风有一点凉，记得多穿一件衣服。" * 25  # 450 characters, weight 900
    message_id = reply_of(vuser, text, fake_llm=fake_llm)
    res = vuser.get("/chat/voice", params={"message_id": message_id})
    assert res.status_code == 200
    pieces = [call["body"]["input"]["text"] for call in fake_tts.requests]
    assert len(pieces) == 2 and "".join(sorted(pieces, key=text.index)) == text
    assert all(weight(p) <= 600 and p.endswith("。") for p in pieces)
    duration = len(mp3_frames(res.content)) * 576 / 24000
    assert abs(duration - (len(text) * TONE_S + 0.2)) < 0.3  # both pieces, and the pause between them


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ({"status": 500, "body": {"code": "InternalError", "message": "x"}}, "UpstreamHTTPError"),
        ({"status": 400, "body": {"code": "DataInspectionFailed", "message": "x"}}, "UpstreamHTTPError"),
        ({"status": 0, "delay": 3.0}, "NetworkError"),
        ({"status": 403, "download": True}, "UpstreamHTTPError"),
    ],
    ids=["500", "refused", "timeout", "download-403"],
)
def test_a_failing_provider_is_a_502_and_nothing_is_cached(vuser, fake_llm, fake_tts, db_url, fault, code):
    message_id = reply_of(vuser, "这次语音服务出错了。", fake_llm=fake_llm)
    fake_tts.fail(times=1, **fault)
    res = vuser.get("/chat/voice", params={"message_id": message_id})
    assert_error(res, 502, code)
    assert query(db_url, "SELECT COUNT(*) FROM voice_clips WHERE message_id = ?", (message_id,)) == [(0,)]
    time.sleep(0.1)
    assert vuser.get("/chat/voice", params={"message_id": message_id}).status_code == 200  # tried afresh


def clip_files(audio_dir: Path, message_id: int) -> list[Path]:
    return list(audio_dir.rglob(f"{message_id}-*.mp3"))


def test_deleting_or_replacing_a_reply_removes_its_audio(vuser, fake_llm, fake_tts, audio_dir, db_url):
    message_id = reply_of(vuser, "删掉我吧。", fake_llm=fake_llm)
    assert vuser.get("/chat/voice", params={"message_id": message_id}).status_code == 200
    assert clip_files(audio_dir, message_id)
    assert vuser.post("/chat/message/delete", {"message_id": message_id}).status_code == 200
    assert not clip_files(audio_dir, message_id)
    assert query(db_url, "SELECT COUNT(*) FROM voice_clips WHERE message_id = ?", (message_id,)) == [(0,)]

    replaced = reply_of(vuser, "重新生成会替换我。", fake_llm=fake_llm)
    vuser.get("/chat/voice", params={"message_id": replaced})
    fake_llm.enqueue(text="新的回复。")
    res = vuser.post("/chat/regenerate", {"role_code": "naitang"}, stream=True)
    res.content  # noqa: B018 - read the stream to its end
    assert not clip_files(audio_dir, replaced)

    cleared = reply_of(vuser, "清空会话。", fake_llm=fake_llm)
    vuser.get("/chat/voice", params={"message_id": cleared})
    assert vuser.post("/chat/clear", {"role_code": "naitang"}).status_code == 200
    assert not clip_files(audio_dir, cleared)

    res = vuser.post("/chat/conversations", {"role_code": "dudu"})
    conversation_id = res.json()["conversation"]["conversation_id"]
    fake_llm.enqueue(text="汪！删会话。")
    sent = vuser.post("/chat/send", {"conversation_id": conversation_id, "message": "hi"}).json()
    vuser.get("/chat/voice", params={"message_id": sent["message"]["id"]})
    assert vuser.post("/chat/conversation/delete", {"conversation_id": conversation_id}).status_code == 200
    assert not clip_files(audio_dir, sent["message"]["id"])


def test_account_deletion_removes_the_users_audio(
    voice_server, login_server, new_user, fake_llm, fake_tts, audio_dir, db_url, start_server
):
    uid, token = new_user()
    client = Client(voice_server.base_url, token=token)
    message_id = reply_of(client, "注销以后我也会消失。", fake_llm=fake_llm)
    assert client.get("/chat/voice", params={"message_id": message_id}).status_code == 200
    # LoginService deletes the account; it needs to see the same audio store as ChatService.
    login = start_server("login", AICHAT_DB_URL=db_url, AICHAT_AUDIO_DIR=str(audio_dir))
    assert Client(login.base_url, token=token).post("/account/delete", {}).status_code == 200
    assert not clip_files(audio_dir, message_id)
    assert query(db_url, "SELECT COUNT(*) FROM voice_clips WHERE uid = ?", (uid,)) == [(0,)]
    assert query(db_url, "SELECT COUNT(*) FROM voice_events WHERE uid = ?", (uid,)) == [(0,)]


# -- limits, OSS, the other provider (in-process apps with settings of their own) ------------------------


def voice_app(chat_app, fake_tts, tmp_path, **overrides):
    values = {"dashscope_base_url": fake_tts.base_url, "audio_dir": str(tmp_path / "audio"), **overrides}
    return chat_app(**values)


def app_reply(client: AppClient, fake_llm, text: str) -> int:
    fake_llm.enqueue(text=text)
    res = client.post("/chat/send", {"role_code": "naitang", "message": "说"})
    assert res.status_code == 200, res.text
    return res.json()["message"]["id"]


def test_voice_requests_and_characters_are_limited(chat_app, fake_llm, fake_tts, new_user, tmp_path):
    app = voice_app(chat_app, fake_tts, tmp_path, voice_per_minute=2, voice_chars_per_day=30)
    client = AppClient(app, token=new_user()[1])
    message_id = app_reply(client, fake_llm, "一二三四五六七八九十。")  # 11 characters
    for _ in range(2):
        assert client.get("/chat/voice", {"message_id": message_id}).status_code == 200
    res = client.get("/chat/voice", {"message_id": message_id})
    assert_error(res, 429, "RateLimited")
    assert 1 <= int(res.headers["Retry-After"]) <= 60
    daily = voice_app(chat_app, fake_tts, tmp_path, voice_per_minute=100, voice_chars_per_day=30)
    other = AppClient(daily, token=new_user()[1])
    ids = [app_reply(other, fake_llm, f"第{i}条回复有十一个字吗。") for i in range(3)]  # 12 characters each
    assert other.get("/chat/voice", {"message_id": ids[0]}).status_code == 200
    assert other.get("/chat/voice", {"message_id": ids[1]}).status_code == 200
    res = other.get("/chat/voice", {"message_id": ids[2]})  # 36 > 30 characters today
    assert_error(res, 429, "RateLimited")
    assert int(res.headers["Retry-After"]) > 3600


def test_cosyvoice_is_the_alternative_provider(chat_app, fake_llm, fake_tts, new_user, tmp_path):
    app = voice_app(chat_app, fake_tts, tmp_path, tts_provider="cosyvoice")
    client = AppClient(app, token=new_user()[1])
    message_id = app_reply(client, fake_llm, "换一个声音。")
    res = client.get("/chat/voice", {"message_id": message_id})
    assert res.status_code == 200 and mp3_frames(res.content)
    (call,) = fake_tts.requests
    assert call["provider"] == "cosyvoice"
    assert call["body"] == {
        "model": "cosyvoice-v3-flash",
        "input": {"text": "换一个声音。", "voice": "longanyang", "format": "wav", "sample_rate": 24000},
    }


@pytest.fixture
def fake_oss() -> Iterator[FakeOss]:
    fake = FakeOss().start()
    yield fake
    fake.stop()


def test_oss_stores_the_clip_and_redirects_to_a_signed_url(chat_app, fake_llm, fake_tts, fake_oss, new_user, tmp_path):
    env = fake_oss.env()
    app = voice_app(
        chat_app,
        fake_tts,
        tmp_path,
        audio_store="oss",
        oss_endpoint=env["AICHAT_OSS_ENDPOINT"],
        oss_bucket=env["AICHAT_OSS_BUCKET"],
        oss_region=env["AICHAT_OSS_REGION"],
        oss_url_ttl_s=120,
        alibaba_access_key_id=env["ALIBABA_CLOUD_ACCESS_KEY_ID"],
        alibaba_access_key_secret=env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
        alibaba_security_token=env["ALIBABA_CLOUD_SECURITY_TOKEN"],
    )
    client = AppClient(app, token=new_user()[1])
    message_id = app_reply(client, fake_llm, "存到对象存储里。")
    res = client.get("/chat/voice", {"message_id": message_id})
    assert res.status_code == 302 and res.headers["Cache-Control"] == "no-store"
    url = res.headers["Location"]
    assert "x-oss-expires=120" in url and "x-oss-security-token=" in url
    put = [entry for entry in fake_oss.log if entry["method"] == "PUT"]
    assert len(put) == 1 and put[0]["problem"] is None  # the upload's V4 signature checked out
    body, content_type = fake_oss.objects[put[0]["key"]]
    assert put[0]["key"].startswith("voice/") and content_type == "audio/mpeg" and mp3_frames(body)
    fetched = requests.get(url, timeout=5)
    assert fetched.status_code == 200 and fetched.content == body
    assert requests.get(url.replace("x-oss-expires=120", "x-oss-expires=999"), timeout=5).status_code == 403
    again = client.get("/chat/voice", {"message_id": message_id})
    assert again.status_code == 302 and fake_tts.synth_count() == 1
    assert client.post("/chat/message/delete", {"message_id": message_id}).status_code == 200
    assert fake_oss.objects == {}  # the signed DELETE removed it
    assert all(entry["problem"] is None for entry in fake_oss.log if not entry["presigned"])


def test_the_tone_the_fake_answers_is_a_real_wav():
    from dev.fake_tts import tone_wav

    with wave.open(io.BytesIO(tone_wav("你好"))) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (24000, 1, 2)
    assert mp3_frames(audio.join_to_mp3([tone_wav("你好"), tone_wav("呀")]))
