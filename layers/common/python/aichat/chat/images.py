"""Image type and size from the first bytes of an upload: magic-byte sniffing and header-only dimensions.

Nothing here decodes pixels, so a tiny file that claims a huge canvas (a decompression bomb) costs only a
few header reads to refuse. Everything is pure: bytes in, values out, no I/O and no third-party modules.
"""

from __future__ import annotations

MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 40_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG caps each side at 2**31 - 1; a larger value can only come from a corrupt or forged header.
_PNG_MAX_SIDE = 2**31 - 1

# SOFn markers carry the frame size. C4 (DHT), C8 (reserved JPG extension) and CC (DAC) share the
# 0xC? range but are table segments, so they are skipped like any other segment.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers with no length field after them: RST0-7, SOI and TEM.
_JPEG_STANDALONE = frozenset({*range(0xD0, 0xD8), 0xD8, 0x01})
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9


def sniff_image_type(data: bytes) -> str | None:
    """Return the MIME type the magic bytes of data announce, or None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    # RIFF is a generic container (WAV and AVI use it too), so the form type at 8..12 must say WEBP.
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_size(data: bytes, mime_type: str) -> tuple[int, int] | None:
    """Return (width, height) read from the header of data, or None when it is truncated, corrupt or 0-sized."""
    reader = _READERS.get(mime_type)
    if reader is None:
        return None
    size = reader(data)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def check_dimensions(size: tuple[int, int] | None) -> str | None:
    """Return a short Chinese reason to refuse an image of this size, or None when it is acceptable."""
    if size is None or size[0] <= 0 or size[1] <= 0:
        return "无法读取图片尺寸"
    width, height = size
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        return (
            f"图片尺寸过大（{width}×{height}），"
            f"单边不能超过 {MAX_IMAGE_SIDE} 像素，总像素不能超过 {MAX_IMAGE_PIXELS // 10_000} 万"
        )
    return None


def _u16be(data: bytes, at: int) -> int:
    """Read a big-endian unsigned 16-bit integer at offset at."""
    return (data[at] << 8) | data[at + 1]


def _u16le(data: bytes, at: int) -> int:
    """Read a little-endian unsigned 16-bit integer at offset at."""
    return data[at] | (data[at + 1] << 8)


def _u24le(data: bytes, at: int) -> int:
    """Read a little-endian unsigned 24-bit integer at offset at."""
    return data[at] | (data[at + 1] << 8) | (data[at + 2] << 16)


def _u32be(data: bytes, at: int) -> int:
    """Read a big-endian unsigned 32-bit integer at offset at."""
    return int.from_bytes(data[at : at + 4], "big")


def _u32le(data: bytes, at: int) -> int:
    """Read a little-endian unsigned 32-bit integer at offset at."""
    return int.from_bytes(data[at : at + 4], "little")


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Return the size from a PNG's IHDR chunk, which the format requires to be the very first chunk."""
    # Signature (8) + IHDR length (4) + type (4) + 13 data bytes + CRC (4): the whole chunk must be
    # present, so a cut-off upload is refused rather than sized from a half-read header.
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE:
        return None
    if _u32be(data, 8) != 13 or data[12:16] != b"IHDR":
        return None
    width, height = _u32be(data, 16), _u32be(data, 20)
    if width > _PNG_MAX_SIDE or height > _PNG_MAX_SIDE:
        return None
    return width, height


def _gif_size(data: bytes) -> tuple[int, int] | None:
    """Return the logical screen size from a GIF's header."""
    # Header (6) + logical screen descriptor (7); only 6..10 hold the size, but a shorter file is cut off.
    if len(data) < 13 or data[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    return _u16le(data, 6), _u16le(data, 8)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Return the canvas size from the first chunk of a WebP, in its VP8, VP8L or VP8X flavour."""
    # RIFF header (12) + first chunk header (8); the chunk payload starts at 20.
    if len(data) < 20 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    fourcc, chunk_size, body = data[12:16], _u32le(data, 16), 20
    if fourcc == b"VP8 ":
        # Lossy: a 3-byte frame tag, the start code 9D 01 2A, then 16-bit little-endian width and height
        # whose top 2 bits are an upscaling hint, not part of the size (RFC 6386 9.1, libwebp VP8GetInfo).
        if chunk_size < 10 or len(data) < body + 10:
            return None
        # Bit 0 of the frame tag is 0 only on a key frame, the only kind that carries dimensions.
        if data[body] & 1 or data[body + 3 : body + 6] != b"\x9d\x01\x2a":
            return None
        return _u16le(data, body + 6) & 0x3FFF, _u16le(data, body + 8) & 0x3FFF
    if fourcc == b"VP8L":
        # Lossless: signature 0x2F, then 32 bits read LSB first: width-1 (14), height-1 (14),
        # alpha_is_used (1), version (3), and the version must be 0 (WebP lossless bitstream spec).
        if chunk_size < 5 or len(data) < body + 5 or data[body] != 0x2F:
            return None
        bits = _u32le(data, body + 1)
        if bits >> 29:
            return None
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8X":
        # Extended: flags (1), reserved (3), then 24-bit little-endian canvas width-1 and height-1.
        if chunk_size < 10 or len(data) < body + 10:
            return None
        return _u24le(data, body + 4) + 1, _u24le(data, body + 7) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Return the frame size from the first SOFn segment of a JPEG, walking the segments after SOI."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    at, end = 2, len(data)
    # Every pass consumes at least one byte, so len(data) passes is a hard bound even for hostile input.
    for _ in range(end):
        if at >= end or data[at] != 0xFF:
            # Between segments only a marker may follow; anything else means a corrupt file.
            return None
        # A marker may be preceded by any number of 0xFF fill bytes (T.81 B.1.1.2).
        while at < end and data[at] == 0xFF:
            at += 1
        if at >= end:
            return None
        marker = data[at]
        at += 1
        if marker in _JPEG_STANDALONE:
            continue
        # FF 00 is byte stuffing inside entropy-coded data, never a marker here; a scan or the end of the
        # image before any SOFn means there is no frame size to find (SOFn always precedes the first scan).
        if marker in (0x00, _JPEG_SOS, _JPEG_EOI):
            return None
        if at + 2 > end:
            return None
        length = _u16be(data, at)
        # The length counts its own two bytes, so anything below 2 would loop or walk backwards.
        if length < 2 or at + length > end:
            return None
        if marker in _JPEG_SOF:
            # Length (2), precision (1), height (2), width (2), component count (1), then 3 bytes each.
            if length < 8 or data[at + 7] == 0 or length < 8 + 3 * data[at + 7]:
                return None
            return _u16be(data, at + 5), _u16be(data, at + 3)
        at += length
    return None


_READERS = {
    "image/png": _png_size,
    "image/gif": _gif_size,
    "image/webp": _webp_size,
    "image/jpeg": _jpeg_size,
}
