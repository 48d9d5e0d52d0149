"""Header-only image sniffing and sizing: hand-built headers of every format, truncation and random bytes."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from aichat.chat.images import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    check_dimensions,
    image_size,
    sniff_image_type,
)

MIME_TYPES = ("image/png", "image/gif", "image/webp", "image/jpeg")


# --- minimal valid headers -------------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (8-bit RGB), with its CRC, then an empty IDAT and IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


PNG_HEADER_LEN = 33


def gif(width: int, height: int, version: bytes = b"89a") -> bytes:
    """A GIF header and logical screen descriptor (no global colour table), then the trailer."""
    return b"GIF" + version + struct.pack("<HHBBB", width, height, 0, 0, 0) + b";"


GIF_HEADER_LEN = 13


def riff(fourcc: bytes, payload: bytes) -> bytes:
    """A RIFF/WEBP container holding one chunk (padded to an even size, as RIFF requires)."""
    body = fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def webp_vp8(width: int, height: int, scale: int = 0) -> bytes:
    """A lossy WebP: key frame tag (version 0, shown, partition size 0), start code, 14-bit sizes."""
    tag = (0 << 0) | (0 << 1) | (1 << 4)  # key frame, version 0, show_frame
    frame = struct.pack("<I", tag)[:3] + b"\x9d\x01\x2a"
    frame += struct.pack("<HH", width | (scale << 14), height | (scale << 14))
    return riff(b"VP8 ", frame + b"\x00" * 8)


def webp_vp8l(width: int, height: int, alpha: bool = False) -> bytes:
    """A lossless WebP: signature 0x2F then width-1, height-1, alpha and version packed LSB first."""
    bits = (width - 1) | ((height - 1) << 14) | (int(alpha) << 28)
    return riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\x00" * 4)


def webp_vp8x(width: int, height: int, flags: int = 0) -> bytes:
    """An extended WebP: flags, 3 reserved bytes, 24-bit canvas width-1 and height-1, then a VP8L chunk."""
    vp8x = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    inner = riff(b"VP8X", vp8x)[12:] + riff(b"VP8L", b"\x2f" + b"\x00" * 8)[12:]
    return b"RIFF" + struct.pack("<I", 4 + len(inner)) + b"WEBP" + inner


WEBP_HEADER_LEN = {"vp8": 30, "vp8l": 25, "vp8x": 30}


def segment(marker: int, body: bytes) -> bytes:
    """A JPEG marker segment: FF, marker, a length that counts itself, then the body."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


APP0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
DQT = segment(0xDB, b"\x00" + bytes(range(1, 65)))
DHT = segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
DAC = segment(0xCC, b"\x00\x10")
JPG_EXT = segment(0xC8, b"\x00\x00\x00\x00\x00\x00")
SOS_AND_DATA = segment(0xDA, b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00") + b"\x12\xff\x00\x34\xff\xd0\x56"
EOI = b"\xff\xd9"


def sof(marker: int, width: int, height: int, components: int = 3) -> bytes:
    """A SOFn segment: precision 8, height, width, then 3 bytes per component."""
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    return segment(marker, struct.pack(">BHHB", 8, height, width, components) + comps)


def jpeg(width: int, height: int, marker: int = 0xC0, before_sof: bytes = b"") -> tuple[bytes, int]:
    """A baseline-shaped JPEG (SOI, APP0, DQT, extra segments, SOFn, DHT, SOS, data, EOI) and its header length."""
    head = b"\xff\xd8" + APP0 + DQT + before_sof + sof(marker, width, height)
    return head + DHT + SOS_AND_DATA + EOI, len(head)


def all_headers() -> list[tuple[str, str, bytes, int, tuple[int, int]]]:
    """(name, mime type, file, length of the header that must be present, size) for every flavour."""
    cases: list[tuple[str, str, bytes, int, tuple[int, int]]] = []
    for size in [(1, 1), (640, 480), (3, 70000), (100000, 100000)]:
        cases.append((f"png{size}", "image/png", png(*size), PNG_HEADER_LEN, size))
    for size in [(1, 1), (320, 200), (65535, 65535)]:
        cases.append((f"gif{size}", "image/gif", gif(*size), GIF_HEADER_LEN, size))
    for size in [(1, 1), (1024, 768), (16383, 16383)]:
        cases.append((f"vp8{size}", "image/webp", webp_vp8(*size), WEBP_HEADER_LEN["vp8"], size))
    for size in [(1, 1), (800, 600), (16384, 16384)]:
        cases.append((f"vp8l{size}", "image/webp", webp_vp8l(*size), WEBP_HEADER_LEN["vp8l"], size))
    for size in [(1, 1), (4000, 3000), (1 << 24, 1 << 24)]:
        cases.append((f"vp8x{size}", "image/webp", webp_vp8x(*size), WEBP_HEADER_LEN["vp8x"], size))
    for size in [(1, 1), (1920, 1080), (65535, 65535)]:
        data, n = jpeg(*size)
        cases.append((f"jpeg-sof0{size}", "image/jpeg", data, n, size))
    data, n = jpeg(1000, 700, marker=0xC2)
    cases.append(("jpeg-sof2", "image/jpeg", data, n, (1000, 700)))
    # Fill bytes before markers, standalone markers, and the 0xC? segments that are not SOFn.
    data, n = jpeg(123, 45, before_sof=b"\xff\xff\xff" + DHT + b"\xff\x01\xff\xd0" + DAC + b"\xff\xff" + JPG_EXT)
    cases.append(("jpeg-fill", "image/jpeg", data, n, (123, 45)))
    return cases


HEADERS = all_headers()


# --- sniffing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mime", "data", "_n", "_size"), HEADERS, ids=[c[0] for c in HEADERS])
def test_sniff_recognises_each_format(name: str, mime: str, data: bytes, _n: int, _size: tuple[int, int]) -> None:
    assert sniff_image_type(data) == mime


def test_sniff_rejects_other_data() -> None:
    assert sniff_image_type(b"") is None
    assert sniff_image_type(b"\xff\xd8") is None
    assert sniff_image_type(b"\x89PNG\r\n\x1a") is None
    assert sniff_image_type(b"GIF88a" + b"\x00" * 10) is None
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEB") is None
    assert sniff_image_type(b"<svg xmlns='http://www.w3.org/2000/svg'/>") is None
    assert sniff_image_type(b"BM" + b"\x00" * 60) is None
    assert sniff_image_type(bytearray(b"GIF87a")) == "image/gif"


# --- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mime", "data", "_n", "size"), HEADERS, ids=[c[0] for c in HEADERS])
def test_size_of_each_header(name: str, mime: str, data: bytes, _n: int, size: tuple[int, int]) -> None:
    assert image_size(data, mime) == size
    # Other readers never claim a file of another format.
    for other in MIME_TYPES:
        if other != mime:
            assert image_size(data, other) is None


@pytest.mark.parametrize(("name", "mime", "data", "n", "size"), HEADERS, ids=[c[0] for c in HEADERS])
def test_every_truncation_is_none(name: str, mime: str, data: bytes, n: int, size: tuple[int, int]) -> None:
    for cut in range(n):
        assert image_size(data[:cut], mime) is None, cut
    # Once the whole header is there, the rest of the file is not needed.
    for cut in range(n, len(data) + 1):
        assert image_size(data[:cut], mime) == size, cut


def test_huge_png_header_is_reported_and_refused() -> None:
    size = image_size(png(100000, 100000), "image/png")
    assert size == (100000, 100000)
    reason = check_dimensions(size)
    assert reason is not None
    assert reason.startswith("图片尺寸过大")


def test_zero_dimensions_are_none() -> None:
    assert image_size(png(0, 10), "image/png") is None
    assert image_size(png(10, 0), "image/png") is None
    assert image_size(gif(0, 5), "image/gif") is None
    assert image_size(webp_vp8(0, 5), "image/webp") is None
    assert image_size(jpeg(7, 0)[0], "image/jpeg") is None  # height 0 = "set by a DNL marker"


def test_webp_details() -> None:
    # The top two bits of the VP8 size fields are an upscaling hint, not part of the size.
    assert image_size(webp_vp8(300, 200, scale=3), "image/webp") == (300, 200)
    assert image_size(webp_vp8l(300, 200, alpha=True), "image/webp") == (300, 200)
    assert image_size(webp_vp8x(300, 200, flags=0x10), "image/webp") == (300, 200)
    # An inter frame (tag bit 0 set) carries no size.
    frame = bytearray(webp_vp8(300, 200))
    frame[20] |= 1
    assert image_size(bytes(frame), "image/webp") is None
    # A wrong VP8 start code or VP8L signature, or a VP8L version other than 0, is corrupt.
    frame = bytearray(webp_vp8(300, 200))
    frame[23] = 0x9C
    assert image_size(bytes(frame), "image/webp") is None
    lossless = bytearray(webp_vp8l(300, 200))
    lossless[20] = 0x2E
    assert image_size(bytes(lossless), "image/webp") is None
    lossless = bytearray(webp_vp8l(300, 200))
    lossless[24] |= 0x20
    assert image_size(bytes(lossless), "image/webp") is None
    # A chunk size too small for the header it claims to hold is corrupt.
    small = bytearray(webp_vp8x(300, 200))
    small[16:20] = struct.pack("<I", 9)
    assert image_size(bytes(small), "image/webp") is None
    # Other first chunks (ALPH, ANIM, unknown) do not give a size.
    assert image_size(riff(b"ALPH", b"\x00" * 16), "image/webp") is None


def test_png_ihdr_must_be_first_and_well_formed() -> None:
    data = png(10, 20)
    assert image_size(data[:12] + b"IHDX" + data[16:], "image/png") is None
    assert image_size(data[:8] + struct.pack(">I", 14) + data[12:], "image/png") is None
    assert image_size(data[:16] + struct.pack(">I", 2**31) + data[20:], "image/png") is None


def test_jpeg_malformed_segments() -> None:
    soi_app0 = b"\xff\xd8" + APP0
    # A scan or EOI before any SOFn, a length below 2, garbage between segments, stuffing in place of a marker.
    assert image_size(soi_app0 + SOS_AND_DATA + sof(0xC0, 10, 20), "image/jpeg") is None
    assert image_size(soi_app0 + EOI + sof(0xC0, 10, 20), "image/jpeg") is None
    assert image_size(soi_app0 + b"\xff\xe1\x00\x01" + sof(0xC0, 10, 20), "image/jpeg") is None
    assert image_size(soi_app0 + b"\x00" + sof(0xC0, 10, 20), "image/jpeg") is None
    assert image_size(soi_app0 + b"\xff\x00" + sof(0xC0, 10, 20), "image/jpeg") is None
    # A SOFn too short for its fields, or with no components, is corrupt.
    assert image_size(soi_app0 + segment(0xC0, b"\x08\x00\x14\x00\x0a"), "image/jpeg") is None
    assert image_size(soi_app0 + sof(0xC0, 10, 20, components=0), "image/jpeg") is None
    assert image_size(soi_app0 + segment(0xC0, sof(0xC0, 10, 20)[4:-1]), "image/jpeg") is None
    # Every SOFn flavour gives the size; the 0xC? table segments do not.
    for marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
        assert image_size(soi_app0 + sof(marker, 10, 20), "image/jpeg") == (10, 20), hex(marker)
    for marker in (0xC4, 0xC8, 0xCC):
        assert image_size(soi_app0 + sof(marker, 10, 20), "image/jpeg") is None, hex(marker)
    # A long run of fill bytes or many segments is walked, not refused.
    many = b"\xff\xd8" + segment(0xFE, b"x") * 5000 + b"\xff" * 5000 + sof(0xC0, 10, 20)
    assert image_size(many, "image/jpeg") == (10, 20)
    assert image_size(b"\xff\xd8" + b"\xff" * 10000, "image/jpeg") is None


def test_unknown_mime_type() -> None:
    assert image_size(png(10, 10), "image/bmp") is None
    assert image_size(png(10, 10), "") is None


# --- check_dimensions ------------------------------------------------------------------------------


def test_check_dimensions_limits() -> None:
    assert check_dimensions(None) == "无法读取图片尺寸"
    assert check_dimensions((0, 10)) == "无法读取图片尺寸"
    assert check_dimensions((1, 1)) is None
    assert check_dimensions((MAX_IMAGE_SIDE, 1)) is None
    assert check_dimensions((1, MAX_IMAGE_SIDE)) is None
    assert check_dimensions((8000, 5000)) is None  # exactly MAX_IMAGE_PIXELS
    assert MAX_IMAGE_PIXELS == 8000 * 5000
    for size in [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1), (8000, 5001), (100000, 100000)]:
        reason = check_dimensions(size)
        assert reason is not None and reason.startswith("图片尺寸过大"), size


# --- robustness ------------------------------------------------------------------------------------


def _check_result(result: object) -> None:
    assert result is None or (
        isinstance(result, tuple) and len(result) == 2 and all(isinstance(v, int) and v > 0 for v in result)
    ), result


def test_random_bytes_never_raise() -> None:
    rng = random.Random(20240611)
    prefixes = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]
    prefixes += [b"RIFF\x00\x00\x00\x00WEBP" + f for f in (b"VP8 ", b"VP8L", b"VP8X")]
    for _ in range(4000):
        data = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 80))
        mime = sniff_image_type(data)
        assert mime is None or mime in MIME_TYPES
        for kind in MIME_TYPES:
            _check_result(image_size(data, kind))
            _check_result(image_size(bytearray(data), kind))


def test_mutated_headers_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        _name, mime, data, _n, _size = rng.choice(HEADERS)
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        _check_result(image_size(bytes(mutated[: rng.randrange(len(mutated) + 1)]), mime))
        _check_result(image_size(bytes(mutated), mime))


# --- cross-check against Pillow, when the venv happens to have it -----------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime", "options"),
    [
        ("PNG", "image/png", {}),
        ("GIF", "image/gif", {}),
        ("JPEG", "image/jpeg", {}),
        ("JPEG", "image/jpeg", {"progressive": True}),
        ("WEBP", "image/webp", {}),
        ("WEBP", "image/webp", {"lossless": True}),
    ],
)
def test_matches_pillow(fmt: str, mime: str, options: dict[str, object]) -> None:
    image_module = pytest.importorskip("PIL.Image")
    for size in [(1, 1), (17, 3), (640, 480), (1001, 77)]:
        for mode in ("RGB", "RGBA") if fmt in ("PNG", "WEBP") else ("RGB",):
            buf = io.BytesIO()
            try:
                image_module.new(mode, size, (10, 200, 30, 128)[: len(mode)]).save(buf, fmt, **options)
            except (KeyError, OSError) as exc:  # a Pillow built without this codec
                pytest.skip(f"Pillow cannot write {fmt}: {exc}")
            data = buf.getvalue()
            assert sniff_image_type(data) == mime
            assert image_size(data, mime) == size, (fmt, mode, options)
