"""JPEG and PNG checks: decode fully, find what a GPU decoder cannot take, re-encode it."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

REPAIR_QUALITY = 95


class BadFile(Exception):
    """A frame or mask file that cannot be used; the message is the reason recorded in the report."""


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame (not DHT, JPG, DAC)
_BASELINE_SOF = 0xC0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_frame_header(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, bits per sample, number of components) of a JPEG stream, read from the marker
    segments before the first scan; None if there is none."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF_MARKERS:
            return (marker, data[pos + 4], data[pos + 9]) if pos + 10 <= len(data) else None
        elif marker in (0xD9, 0xDA):  # end of image, start of scan
            return None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _describe_non_jpeg(data: bytes) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "not a JPEG (PNG data)"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "not a JPEG (GIF data)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "not a JPEG (WebP data)"
    return f"not a JPEG (starts with {data[:4].hex()})"


def decode_jpeg(data: bytes) -> tuple[Image.Image, str | None]:
    """Fully decode a JPEG; returns the image and why it must be re-encoded (None: keep the bytes).
    Raises BadFile with the reason when the data is not a decodable JPEG."""
    if not data:
        raise BadFile("empty file (0 bytes)")
    if not data.startswith(b"\xff\xd8\xff"):
        raise BadFile(_describe_non_jpeg(data))
    image = _decode(data)
    if image.format not in ("JPEG", "MPO"):
        raise BadFile(f"not a JPEG (decoded as {image.format})")
    header = jpeg_frame_header(data)
    if header is None:
        raise BadFile("JPEG without a frame header")
    marker, bits, components = header
    if marker == 0xC2:
        return image, "progressive JPEG"
    if components == 4:
        return image, f"{image.mode} JPEG"
    if components == 1:
        return image, "grayscale JPEG"
    if marker != _BASELINE_SOF or bits != 8 or components != 3:
        return image, f"non-baseline JPEG (SOF 0x{marker:02X}, {bits}-bit, {components} components)"
    return image, None


def encode_jpeg(image: Image.Image, size: tuple[int, int] | None) -> bytes:
    """Baseline RGB JPEG at quality 95, resized to `size` (width, height) if given."""
    image = image.convert("RGB")
    if size is not None and size != image.size:
        image = image.resize(size, Image.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=REPAIR_QUALITY, subsampling="4:2:0", optimize=False, progressive=False)
    return buffer.getvalue()


def downscaled_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """(width, height) with the longer side max_side, or None when no downscale is needed."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_png(data: bytes) -> Image.Image:
    """Fully decode a PNG; raises BadFile with the reason when it is not a decodable PNG."""
    if not data.startswith(_PNG_SIGNATURE):
        raise BadFile("empty file (0 bytes)" if not data else f"not a PNG (starts with {data[:4].hex()})")
    return _decode(data)


def _decode(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:  # its message holds an object address, which would make reports differ
        raise BadFile("cannot decode (no image format recognised)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken streams
        raise BadFile(f"cannot decode ({type(e).__name__}: {e})") from None
    return image
