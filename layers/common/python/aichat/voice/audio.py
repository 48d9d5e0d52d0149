"""Audio the client gets: the providers' WAV pieces joined and encoded once as MP3 (lameenc, loaded lazily).

Why MP3: every browser and both mobile platforms play it in an <audio> element or their system player
with no extra code (Ogg Opus is smaller but Safari plays it only in some containers), and at 48 kbit/s
mono it is 8× smaller than the providers' 24 kHz 16-bit WAV (384 kbit/s) with speech still clear.
"""

from __future__ import annotations

import io
import wave

from ..errors import ApiError

MP3_BITRATE_KBPS = 48
CONTENT_TYPE = "audio/mpeg"


def pcm_of(wav: bytes) -> tuple[bytes, int, int]:
    """The 16-bit PCM frames of a WAV file, its sample rate and channel count (a provider's answer)."""
    try:
        with wave.open(io.BytesIO(wav)) as reader:
            if reader.getsampwidth() != 2:
                raise ApiError("UpstreamHTTPError", "语音服务返回了不支持的音频格式")
            return reader.readframes(reader.getnframes()), reader.getframerate(), reader.getnchannels()
    except (wave.Error, EOFError) as exc:
        raise ApiError("UpstreamHTTPError", "语音服务返回的音频无法解析") from exc


def join_to_mp3(pieces: list[bytes]) -> bytes:
    """One MP3 of the WAV pieces in order (they must share rate and channels, as one voice's do)."""
    import lameenc  # about 1 ms to import; only the voice path needs it

    decoded = [pcm_of(piece) for piece in pieces]
    rates = {(rate, channels) for _, rate, channels in decoded}
    if len(rates) != 1:
        raise ApiError("UpstreamHTTPError", "语音服务返回的音频参数不一致")
    rate, channels = rates.pop()
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(MP3_BITRATE_KBPS)
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(channels)
    encoder.set_quality(5)  # lame's -q 5: good for speech, fast
    pause = b"\0\0" * channels * (rate // 5)  # 200 ms between pieces, as between sentences
    body = pause.join(pcm for pcm, _, _ in decoded)
    return bytes(encoder.encode(body) + encoder.flush())
