"""Hostile inputs, built in code (no downloaded samples): one generator per class of attack on the decoder, the
service and the CLI. Each generator is parametric, so that a test defends the class, not one example.

Classes:
- a header that lies: a JPEG marker chain that hides a small frame header from a naive parser in front of the real,
  large frame; a frame header patched to a huge size in front of a few bytes of scan data;
- sizes over the decoder's own limits while under the pixel limit (a BMP 2,000,000 x 1);
- images that cost many bytes per pixel near the pixel limit (RGBA, 16-bit PNGs of zeros: small files);
- CPU bombs (a progressive JPEG whose scans repeat hundreds of times);
- legal but large photos (a 6000 x 6000 JPEG), and valid photos with a lot of metadata before the frame header
  (150 KB of APP11, as cameras and C2PA write): these must be ACCEPTED;
- truncations of every format at every structural point; formats OpenCV reads but the service does not accept;
- mutations of real JPEG/PNG/WebP/BMP headers (`mutated`, driven by hypothesis in the tests).

`ROWS` names every fixed input with its expected outcome; `hostile_bytes(name)` builds it once.
"""
from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


# --- JPEG building blocks -------------------------------------------------------------------------------------------

def segment(marker: int, payload: bytes) -> bytes:
    "One JPEG marker segment: FF, the marker, the 2-byte length (which counts itself), the payload."
    if len(payload) > 65533: raise ValueError("a JPEG segment holds at most 65,533 bytes")
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_parts(jpeg: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    "(marker, payload) of every segment between SOI and the first SOS, and the rest (SOS, scan data, ..., EOI)."
    assert jpeg[:2] == SOI
    i, segments = 2, []
    while jpeg[i + 1] != 0xDA:
        marker, length = jpeg[i + 1], struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        segments.append((marker, jpeg[i + 4:i + 2 + length]))
        i += 2 + length
    return segments, jpeg[i:]


def jpeg_join(segments: list[tuple[int, bytes]], rest: bytes) -> bytes:
    return SOI + b"".join(segment(m, p) for m, p in segments) + rest


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok, ext
    return buf.tobytes()


def gradient(width: int, height: int) -> np.ndarray:
    "A smooth BGR image (cheap to build and to compress, at any size)."
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = x; image[..., 1] = y; image[..., 2] = (x + y) / 2
    return image


def small_jpeg(side: int = 16, quality: int = 50, progressive: bool = False) -> bytes:
    return encode(gradient(side, side), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality,
                                                 cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])


def frame_header(width: int, height: int, components: int = 3) -> bytes:
    "The payload of a baseline SOF0 segment: 8-bit precision, `components` with tables 0/1/1, 4:2:0 luma sampling."
    comps = b"".join(bytes((c + 1, 0x22 if c == 0 else 0x11, 0 if c == 0 else 1)) for c in range(components))
    return struct.pack(">BHHB", 8, height, width, components) + comps


def with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    "`jpeg` with its frame header claiming `width` x `height` (the scan data stays that of the small image)."
    segments, rest = jpeg_parts(jpeg)
    patched = [(m, p[:1] + struct.pack(">HH", height, width) + p[5:]) if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)
               else (m, p) for m, p in segments]
    return jpeg_join(patched, rest)


def size_bomb_jpeg(width: int = 10_000, height: int = 10_000) -> bytes:
    "A few hundred bytes whose (only) frame header claims `width` x `height`: libjpeg fills the missing rows."
    return with_frame_size(small_jpeg(), width, height)


def misleading_jpeg(width: int = 10_000, height: int = 10_000, decoy: tuple[int, int] = (8, 8)) -> bytes:
    """A stray `FF 00` right after SOI, then an APP1 segment with a decoy frame header for `decoy` inside its payload,
    then the real frame of `width` x `height`. A parser that reads `FF 00` as a segment with a length lands on the
    decoy; libjpeg skips `FF 00` and the bytes up to the next marker as garbage, skips APP1 by its length, and decodes
    the real frame."""
    segments, rest = jpeg_parts(size_bomb_jpeg(width, height))
    skip = 20  # the naive parser reads these two bytes as the length of the `FF 00` "segment"
    app1 = bytearray(b"Exif\x00\x00" + b"\x00" * 40)
    decoy_at = 4 + skip - 10  # where it lands (after SOI, FF 00 and the length) in the APP1 payload (which starts at 10)
    decoy_sof = segment(0xC0, frame_header(*decoy))
    app1[decoy_at:decoy_at + len(decoy_sof)] = decoy_sof
    stray = b"\xff\x00" + struct.pack(">H", skip)
    return SOI + stray + segment(0xE1, bytes(app1)) + b"".join(segment(m, p) for m, p in segments) + rest


def jpeg_with_metadata(jpeg: bytes, total: int = 150_000, marker: int = 0xEB, chunk: int = 60_000) -> bytes:
    "`jpeg` with `total` bytes of APPn metadata (default APP11, as JUMBF/C2PA) right after its first segment."
    segments, rest = jpeg_parts(jpeg)
    blobs, left, n = [], total, 0
    while left > 0:
        size = min(chunk, left)
        body = b"JP" + struct.pack(">HI", 0, n) + bytes((n * 7 + i) % 251 for i in range(size - 8))
        blobs.append((marker, body)); left -= size; n += 1
    return jpeg_join(segments[:1] + blobs + segments[1:], rest)


def large_jpeg(width: int = 6000, height: int = 6000, quality: int = 10, progressive: bool = False) -> bytes:
    "A legal photo-sized JPEG (a smooth gradient at low quality stays small: a few hundred KB)."
    return encode(gradient(width, height), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality,
                                                    cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])


def many_scans_jpeg(side: int = 2000, repeats: int = 2000) -> bytes:
    "A progressive JPEG whose last scan repeats `repeats` times (libjpeg warns and runs each one: a CPU bomb)."
    jpeg = large_jpeg(side, side, quality=30, progressive=True)
    body, last = jpeg[:-2], jpeg.rfind(b"\xff\xda")
    return body + jpeg[last:-2] * repeats + EOI


# --- PNG, BMP, WebP -------------------------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> colour type (gray, gray+alpha, RGB, RGBA)


def zeros_png(width: int = 6300, height: int = 6300, channels: int = 4, depth: int = 8) -> bytes:
    "A PNG of zeros (fully transparent black when it has alpha): megapixels in a few hundred KB, built row by row."
    row = b"\x00" * (1 + width * channels * depth // 8)  # filter byte 0, then the samples
    z, parts, rows_at_once = zlib.compressobj(9), [], max(1, 4_000_000 // len(row))
    for start in range(0, height, rows_at_once): parts.append(z.compress(row * min(rows_at_once, height - start)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    "A PNG whose header claims `width` x `height`, followed by a little data (a decompression bomb by its header)."
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b"")


def bmp(width: int, height: int, bits: int = 1, pixels: bytes | None = None) -> bytes:
    "An uncompressed BMP (BITMAPINFOHEADER); 1-, 4- and 8-bit ones get a grey palette. Rows of zeros by default."
    palette_size = 1 << bits if bits <= 8 else 0
    palette = b"".join(bytes((v, v, v, 0)) for v in np.linspace(0, 255, palette_size).astype(int)) if palette_size else b""
    stride = (width * bits + 31) // 32 * 4
    data = pixels if pixels is not None else b"\x00" * (stride * abs(height))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, len(data), 2835, 2835, palette_size, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def wide_bmp(width: int = 2_000_000, height: int = 1) -> bytes:
    "A 1-bit BMP `width` x `height`: under the pixel limit, over OpenCV's width limit (2^20); 250 KB."
    return bmp(width, height, bits=1)


def webp_with_canvas(webp: bytes, width: int, height: int) -> bytes:
    "An extended WebP (VP8X) whose canvas claims `width` x `height` around the frame of `webp` (a lossy VP8 file)."
    assert webp[12:16] in (b"VP8 ", b"VP8L"), webp[12:16]
    chunk = webp[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- truncations, other formats, mutations --------------------------------------------------------------------------

@functools.cache
def unsupported_formats() -> dict[str, bytes]:
    "Formats OpenCV may decode that the service does not accept, and things that are not images at all."
    image = gradient(32, 32)
    out = {"tiff": encode(image, ".tiff"), "ppm": encode(image, ".ppm"), "pgm": encode(image[..., 0], ".pgm"),
           "gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
           "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>',
           "html": b"<!doctype html><title>x</title>", "zip": b"PK\x03\x04" + b"\x00" * 60, "text": b"cat or dog?\n",
           "nul": b"\x00" * 1000}
    return out


def base_images(photos: list[Path]) -> dict[str, bytes]:
    "Real photos encoded in every accepted format (the seeds of the mutation fuzzer)."
    out = {}
    for i, p in enumerate(photos):
        image = cv2.imread(str(p))
        bgra = np.dstack([image, np.full(image.shape[:2], 200, np.uint8)])
        out[f"jpeg{i}"] = p.read_bytes()
        out[f"jpeg_progressive{i}"] = encode(image, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
        out[f"png{i}"] = encode(image, ".png")
        out[f"png_rgba{i}"] = encode(bgra, ".png")
        out[f"png16_{i}"] = encode(image.astype(np.uint16) * 257, ".png")
        out[f"webp{i}"] = encode(image, ".webp")
        out[f"webp_lossless{i}"] = encode(bgra, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
        out[f"bmp{i}"] = encode(image, ".bmp")
    return out


MUTATIONS = ("flip", "set", "insert", "delete", "truncate", "be16", "le16", "be32", "le32")
# sizes and lengths that sit on the limits of decoders (AFL's "interesting values", plus OpenCV's and JPEG's limits)
INTERESTING = (0, 1, 2, 7, 8, 255, 256, 1023, 4096, 16_383, 16_384, 32_767, 32_768, 65_500, 65_535, 65_536,
               1 << 20, (1 << 20) + 1, 40_000_001, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)


def mutated(data: bytes, edits: list[tuple[str, int, int]], window: int = 512) -> bytes:
    """`data` with each `(kind, position, value)` edit applied inside its first `window` bytes: a bit flipped, a byte
    set, bytes inserted or deleted, the data cut, or a 16/32-bit field (big or little endian) set to an interesting
    value (`value` indexes `INTERESTING`)."""
    out = bytearray(data)
    for kind, position, value in edits:
        i = position % max(1, min(window, len(out)))
        if kind == "flip": out[i] ^= 1 << (value % 8)
        elif kind == "set": out[i] = value & 0xFF
        elif kind == "insert": out[i:i] = bytes((value & 0xFF,)) * (1 + value // 256)
        elif kind == "delete": del out[i:i + 1 + value // 256]
        elif kind == "truncate": del out[max(1, i + value * 64):]
        else:
            width, order = int(kind[2:]) // 8, "big" if kind.startswith("be") else "little"
            number = INTERESTING[value % len(INTERESTING)] % (1 << (8 * width))
            out[i:i + width] = number.to_bytes(width, order)
    return bytes(out)


def with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    "`jpeg` with an APP1 Exif segment carrying a whole JPEG thumbnail (its own SOI, frame header, scan and EOI)."
    segments, rest = jpeg_parts(jpeg)
    return jpeg_join(segments[:1] + [(0xE1, b"Exif\x00\x00" + thumbnail)] + segments[1:], rest)


def with_bytes_before_frame(jpeg: bytes, junk: bytes) -> bytes:
    "`jpeg` with `junk` inserted right before its frame header (fill bytes `FF` are legal, anything else is not)."
    sof = next(i for i in range(2, len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xC0)
    return jpeg[:sof] + junk + jpeg[sof:]


@functools.cache
def photo_jpeg() -> bytes:
    "A 200 x 200 JPEG like the dataset's photos."
    return large_jpeg(200, 200, quality=90)


@functools.cache
def small_photo(fmt: str) -> bytes:
    return photo_jpeg() if fmt == "jpeg" else encode(gradient(200, 200), f".{fmt}")


CUTS = ("signature", "header", "first_kb", "half", "last_byte")


def truncated(data: bytes, cut: str) -> bytes:
    "`data` cut at a structural point: inside the signature, the header, the first KB, half-way, the last byte."
    return data[:{"signature": 3, "header": 20, "first_kb": 1024, "half": len(data) // 2, "last_byte": len(data) - 1}[cut]]


# expected outcomes: `too_large` (413 / ImageTooLargeError), `refused` (400 or 413 / any ImageError),
# `valid` (200 / an H x W x 3 uint8 array), `either` (refused or valid: the bytes are complete enough to decode)
ROWS: dict[str, tuple[Callable[[], bytes], str]] = {
    "misleading_marker_chain": (misleading_jpeg, "refused"),
    "misleading_marker_chain_small_frame": (lambda: misleading_jpeg(200, 200), "refused"),
    "size_bomb_jpeg": (size_bomb_jpeg, "too_large"),
    "bomb_behind_exif_thumbnail": (lambda: with_exif_thumbnail(size_bomb_jpeg(), small_jpeg(8)), "too_large"),
    "garbage_before_frame": (lambda: with_bytes_before_frame(photo_jpeg(), b"\x00\x17\x42"), "refused"),
    "jpeg_zero_height": (lambda: size_bomb_jpeg(200, 0), "refused"),
    "jpeg_over_format_limit": (lambda: size_bomb_jpeg(65_535, 1), "refused"),
    "many_scans_jpeg": (many_scans_jpeg, "refused"),
    "wide_bmp": (wide_bmp, "refused"),
    "tall_bmp": (lambda: wide_bmp(1, 2_000_000), "refused"),
    "bmp_negative_width": (lambda: bmp(-200, 200, bits=8, pixels=b"\x00" * 200 * 200), "refused"),
    "wide_png": (lambda: zeros_png(2_000_000, 1, channels=1), "refused"),
    "png_header_bomb": (lambda: png_header_only(100_000, 100_000), "too_large"),
    "webp_canvas_lies": (lambda: webp_with_canvas(encode(gradient(64, 64), ".webp"), 16_000, 16_000), "too_large"),
    # near the pixel limit, alpha and 16 bits cost 4 and 8 bytes a pixel: decoded within the memory ceiling, or 413
    "rgba_png_near_limit": (lambda: zeros_png(6300, 6300, channels=4, depth=8), "either"),
    "rgba16_png_near_limit": (lambda: zeros_png(6300, 6300, channels=4, depth=16), "either"),
    "rgba_png_25mp": (lambda: zeros_png(5000, 5000, channels=4, depth=8), "valid"),
    "rgba16_png_14mp": (lambda: zeros_png(3800, 3800, channels=4, depth=16), "valid"),
    "gray16_png_near_limit": (lambda: zeros_png(6300, 6300, channels=1, depth=16), "valid"),
    "camera_jpeg_150kb_app11": (lambda: jpeg_with_metadata(photo_jpeg()), "valid"),
    "camera_jpeg_500kb_app11": (lambda: jpeg_with_metadata(photo_jpeg(), 500_000), "valid"),
    "photo_with_exif_thumbnail": (lambda: with_exif_thumbnail(photo_jpeg(), small_jpeg(160)), "valid"),
    "fill_bytes_before_frame": (lambda: with_bytes_before_frame(photo_jpeg(), b"\xff\xff\xff"), "valid"),
    "photo_then_second_jpeg": (lambda: photo_jpeg() + small_jpeg(64), "valid"),  # MPF: previews, depth maps after EOI
    **{f"truncated_{fmt}_{cut}": (functools.partial(lambda f, c: truncated(small_photo(f), c), fmt, cut),
                                  "either" if cut == "last_byte" else "refused")
       for fmt in ("jpeg", "png", "webp", "bmp") for cut in CUTS},
    **{f"unsupported_{fmt}": (functools.partial(lambda f: unsupported_formats()[f], fmt), "refused")
       for fmt in ("tiff", "ppm", "pgm", "gif", "pdf", "svg", "html", "zip", "text", "nul")},
}


@functools.cache
def hostile_bytes(name: str) -> bytes:
    "The bytes of row `name` of `ROWS` (built once)."
    return ROWS[name][0]()
