"""The pictures of `caffe-lmdb serve`: thumbnails fitted to a square, broken-record placeholders, PNG bytes, the cache.

A thumbnail is made on the server from the decoded record (so a planar BGR Datum shows as the
photo it was, and every browser shows the same pixels), kept in a `ByteCache` bounded by bytes.
A record that cannot be shown gets a `placeholder`: a crossed tile with the reason written in it,
served like any image, so that a page of thumbnails always loads whole.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

#: The side of a thumbnail, in pixels (images are fitted into the square, aspect kept).
THUMB_SIDE = 160
#: Bytes of thumbnails kept, all LMDBs together (least recently used dropped first).
THUMB_CACHE_BYTES = 64 << 20


class ByteCache:
    """A thread-safe least-recently-used cache of byte strings (thumbnails), bounded by their total size."""

    def __init__(self, max_bytes: int = THUMB_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[bytes, str | None]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bytes, str | None] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    def put(self, key: Any, item: tuple[bytes, str | None]) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old[0])
            self._items[key] = item
            self._size += len(item[0])
            while self._size > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped[0])


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    """An image as PNG file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def fit(image: Image.Image, side: int) -> Image.Image:
    """Scale to fit a `side` square, aspect kept; enlarging uses NEAREST so small images stay crisp."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if image.width < side and image.height < side:
        return ImageOps.contain(image, (side, side), method=Image.NEAREST)
    image = image.copy()
    image.thumbnail((side, side), Image.BILINEAR, reducing_gap=2.0)
    return image


def placeholder(reason: str, side: int) -> Image.Image:
    """A broken tile: a dark red square, crossed, with the reason written in it."""
    image = Image.new("RGB", (side, side), (70, 24, 24))
    draw = ImageDraw.Draw(image)
    draw.line((0, 0, side, side), fill=(110, 40, 40), width=3)
    draw.line((0, side, side, 0), fill=(110, 40, 40), width=3)
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    y = 4
    for line in _wrapped(draw, font, reason, side - 8)[: max(1, (side - 8) // line_height)]:
        draw.text((4, y), line, fill=(255, 255, 255), font=font)
        y += line_height
    return image


def _wrapped(draw: ImageDraw.ImageDraw, font: Any, text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken at spaces (a long word at any character)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines
