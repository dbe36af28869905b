"""Prototype (phase 1) of the hardened decoder for nbs/01_data.ipynb: header checks that parse the whole JPEG marker
chain and refuse what they cannot parse, OpenCV's own limits enforced from the header, reduced-scale JPEG decoding,
shrinking right after decoding, alpha and depth handled in uint8, every decoder exception typed.

Drop-in for `catdog_nb.data.decode_image` (same signature, same error classes)."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

# OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when the library loads: it must be set before the first `import cv2`.
# In the package this line sits at the top of `catdog_nb/core.py` (see scratch/DESIGN.md, "the OpenCV pixel cap").
DEFAULT_MAX_PIXELS = 40_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", os.environ.get("CATDOG_MAX_PIXELS", str(DEFAULT_MAX_PIXELS)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from catdog_nb.data import (CorruptImageError, EmptyImageError, ImageError, ImageTooLargeError,  # noqa: E402
                            UnsupportedImageError)

MAX_SIDE = 65_500          # libjpeg's JPEG_MAX_DIMENSION; WebP stops at 16,383, OpenCV at 2^20 for any format
MAX_JPEG_SCANS = 64        # progressive encoders write about 10; every scan is a pass over all coefficients
DECODE_TARGET_SIDE = 520   # the shorter side kept after decoding: twice the largest backbone input (lite2, 260 px)
DECODED_MAX_PIXELS = (2 * DECODE_TARGET_SIDE) ** 2  # what a decoded image may hold (1.08 MP, 3.2 MB), panoramas too


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    has_alpha: bool
    bits: int = 8  # per sample: 16-bit images with alpha decode to 8 bytes per pixel


# --- JPEG: the whole marker chain -----------------------------------------------------------------------------------

_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB}          # what libjpeg-turbo decodes
_JPEG_HIERARCHICAL = {0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE, 0xDF}  # differential frames, DHP, EXP: not decoded
_JPEG_TABLES = {0xC4, 0xCC, 0xDB, 0xDD} | set(range(0xE0, 0xF0)) | {0xFE}  # DHT DAC DQT DRI, APPn, COM


def _jpeg_frame(b: bytes) -> tuple[int, int, int, int]:
    "(width, height, components, end of the frame header) of the first frame after SOI; segments skipped by length."
    i, n = 2, len(b)
    while True:
        if i + 4 > n: raise CorruptImageError("JPEG: truncated before the frame header")
        if b[i] != 0xFF: raise CorruptImageError(f"JPEG: byte 0x{b[i]:02X} at offset {i} where a marker must be")
        while b[i + 1] == 0xFF:  # fill bytes
            i += 1
            if i + 4 > n: raise CorruptImageError("JPEG: truncated before the frame header")
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in _JPEG_HIERARCHICAL: raise UnsupportedImageError("JPEG: hierarchical frames are not supported")
        if marker not in _JPEG_FRAMES and marker not in _JPEG_TABLES:
            raise CorruptImageError(f"JPEG: marker 0x{marker:02X} at offset {i} before the frame header")
        if length < 2 or i + 2 + length > n: raise CorruptImageError("JPEG: a segment runs past the end of the data")
        if marker in _JPEG_FRAMES:
            if length < 8: raise CorruptImageError("JPEG: frame header too short")
            precision, height, width, components = struct.unpack(">BHHB", b[i + 4:i + 10])
            if length != 8 + 3 * components or components not in (1, 3, 4):
                raise CorruptImageError(f"JPEG: frame header with {components} components")
            if precision not in (8, 12) and marker != 0xC3: raise UnsupportedImageError(f"JPEG: {precision}-bit samples")
            return width, height, components, i + 2 + length
        i += 2 + length


def _jpeg_header(b: bytes) -> ImageHeader:
    width, height, _, frame_end = _jpeg_frame(b)
    end = b.find(b"\xff\xd9", frame_end)  # FF is stuffed inside scan data: the first EOI after the frame ends it
    if end < 0: raise CorruptImageError("JPEG: truncated (no end-of-image marker)")
    scans = b.count(b"\xff\xda", frame_end, end)
    if scans == 0: raise CorruptImageError("JPEG: no scan data")
    if scans > MAX_JPEG_SCANS: raise CorruptImageError(f"JPEG: {scans} scans (at most {MAX_JPEG_SCANS})")
    return ImageHeader("jpeg", width, height, False)


# --- PNG, WebP, BMP -------------------------------------------------------------------------------------------------

_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}  # colour type -> bit depths


def _png_header(b: bytes) -> ImageHeader:
    import zlib
    if len(b) < 33 or b[8:16] != b"\x00\x00\x00\x0dIHDR": raise CorruptImageError("PNG: no IHDR chunk first")
    if zlib.crc32(b[12:29]) != struct.unpack(">I", b[29:33])[0]: raise CorruptImageError("PNG: IHDR checksum mismatch")
    width, height, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", b[16:29])
    if depth not in _PNG_DEPTHS.get(color_type, ()) or compression or filtering or interlace > 1:
        raise CorruptImageError(f"PNG: invalid header (colour type {color_type}, depth {depth})")
    has_alpha = color_type in (4, 6) or b.find(b"tRNS", 33) > 0  # a tRNS chunk makes palette/RGB/grey transparent
    return ImageHeader("png", width, height, has_alpha, 16 if depth == 16 else 8)


def _webp_header(b: bytes) -> ImageHeader:
    if len(b) < 30: raise CorruptImageError("WebP: truncated header")
    chunk = b[12:16]
    if chunk == b"VP8X":
        w, h = 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
        return ImageHeader("webp", w, h, bool(b[20] & 0x10))
    if chunk == b"VP8L":
        if b[20] != 0x2F: raise CorruptImageError("WebP: bad lossless signature")
        bits = int.from_bytes(b[21:25], "little")
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool((bits >> 28) & 1))
    if chunk == b"VP8 ":
        if b[23:26] != b"\x9d\x01\x2a": raise CorruptImageError("WebP: bad lossy start code")
        w, h = struct.unpack("<HH", b[26:30])
        return ImageHeader("webp", w & 0x3FFF, h & 0x3FFF, False)
    raise CorruptImageError("WebP: unknown first chunk")


_BMP_INFO_SIZES = {12, 40, 52, 56, 108, 124}  # OS/2 core, BITMAPINFOHEADER, its V2/V3 extensions, V4, V5


def _bmp_header(b: bytes) -> ImageHeader:
    if len(b) < 26: raise CorruptImageError("BMP: truncated header")
    info = struct.unpack("<I", b[14:18])[0]
    if info not in _BMP_INFO_SIZES: raise UnsupportedImageError(f"BMP: unknown info header of {info} bytes")
    if info == 12: width, height, planes, bits = struct.unpack("<HHHH", b[18:26]); compression = 0
    else:
        if len(b) < 34: raise CorruptImageError("BMP: truncated header")
        width, height, planes, bits, compression = struct.unpack("<iiHHI", b[18:34])
    if width <= 0 or height == 0 or planes != 1: raise CorruptImageError(f"BMP: invalid size {width}x{height}")
    if bits not in (1, 4, 8, 16, 24, 32) or compression not in (0, 1, 2, 3):
        raise UnsupportedImageError(f"BMP: {bits}-bit, compression {compression}")
    offset = struct.unpack("<I", b[10:14])[0]
    stride = (width * bits + 31) // 32 * 4
    if compression == 0 and offset + stride * abs(height) > len(b): raise CorruptImageError("BMP: truncated pixel data")
    return ImageHeader("bmp", width, abs(height), bits == 32)


def read_header(b: bytes) -> ImageHeader:
    "Format, size and alpha flag, from the header; a typed `ImageError` for whatever this cannot parse."
    if not b: raise EmptyImageError("empty input: zero bytes")
    if b[:3] == b"\xff\xd8\xff": header = _jpeg_header(b)
    elif b[:8] == b"\x89PNG\r\n\x1a\n": header = _png_header(b)
    elif b[:4] == b"RIFF" and b[8:12] == b"WEBP": header = _webp_header(b)
    elif b[:2] == b"BM": header = _bmp_header(b)
    else: raise UnsupportedImageError("not a JPEG, PNG, WebP or BMP image")
    if header.width <= 0 or header.height <= 0: raise CorruptImageError(f"{header.format}: invalid size in header")
    return header


# --- decoding -------------------------------------------------------------------------------------------------------

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_scale(width: int, height: int, target: int = DECODE_TARGET_SIDE) -> int:
    "The largest libjpeg scale denominator (1, 2, 4, 8) that keeps the shorter side at `target` pixels or more."
    return max(s for s in _REDUCED if s == 1 or -(-min(width, height) // s) >= target)


def _composite_on_white(bgra: np.ndarray, rows: int = 256) -> np.ndarray:
    """A BGRA image (8 or 16 bits) over white as 8-bit BGRA, strip by strip in integer arithmetic: no full-size
    float temporaries (today's float32 compositing peaks near 36 bytes per pixel)."""
    out = bgra if bgra.dtype == np.uint8 else np.empty(bgra.shape, np.uint8)  # 8-bit: composited in place
    for top in range(0, bgra.shape[0], rows):
        strip = bgra[top:top + rows]
        if strip.dtype == np.uint16: strip = (strip >> 8).astype(np.uint8)
        alpha = strip[:, :, 3:4].astype(np.uint16)
        out[top:top + rows, :, :3] = (strip[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return out


def _shrink(image: np.ndarray, max_pixels: int = DECODED_MAX_PIXELS) -> np.ndarray:
    "`image` resized (area interpolation) to at most `max_pixels`, so that what waits in the queue is small."
    h, w = image.shape[:2]
    if h * w <= max_pixels: return image
    scale = (max_pixels / (h * w)) ** 0.5
    return cv2.resize(image, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    "Bytes -> upright `H x W x 3` uint8 BGR array of at most `DECODED_MAX_PIXELS`, or a typed `ImageError`."
    header = read_header(data)
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageTooLargeError(f"{header.width}x{header.height} = {pixels:,} pixels is over the limit of {max_pixels:,}")
    # `max_pixels` is the limit of an 8-bit RGB image; images with alpha (4 or 8 bytes per pixel once decoded) get the
    # same number of bytes, so that one decode never holds more than 2 x 3 x max_pixels bytes (libpng double-buffers)
    decoded = pixels * ((8 if header.bits == 16 else 4) if header.has_alpha else 3)
    if decoded > 3 * max_pixels:
        raise ImageTooLargeError(f"{header.width}x{header.height} with alpha decodes to {decoded:,} bytes, over the "
                                 f"limit of {3 * max_pixels:,} ({max_pixels:,} RGB pixels)")
    if max(header.width, header.height) > MAX_SIDE:  # under the pixel limit, over what the decoders accept
        raise CorruptImageError(f"{header.format}: a side of {max(header.width, header.height):,} pixels (at most {MAX_SIDE:,})")
    # Alpha needs UNCHANGED (8 or 16 bits, no EXIF rotation, as before); the rest IMREAD_COLOR (8-bit BGR, EXIF
    # orientation applied), JPEGs reduced by libjpeg while decoding.
    flags = (cv2.IMREAD_UNCHANGED if header.has_alpha else
             _REDUCED[jpeg_scale(header.width, header.height)] if header.format == "jpeg" else cv2.IMREAD_COLOR)
    try: image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error: image = None  # OpenCV's own limits and decoder failures; the header check refuses most first
    if image is None or image.size == 0: raise CorruptImageError(f"{header.format}: the decoder could not read the data")
    if image.dtype not in (np.uint8, np.uint16): raise UnsupportedImageError(f"{header.format}: {image.dtype} samples")
    if image.ndim == 2: image = image[:, :, None]
    if image.shape[2] == 4: return cv2.cvtColor(_shrink(_composite_on_white(image)), cv2.COLOR_BGRA2BGR)
    if image.dtype == np.uint16: image = (image >> 8).astype(np.uint8)  # alpha-less 16-bit WebP/BMP do not exist: kept for safety
    return _shrink(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.shape[2] == 1 else image)
