"""A contact sheet of random records with their labels: the quickest check of colours and labels.

A BGR/RGB mix-up shows as blue faces and orange skies, a label shift as the wrong class name under
a tile; both are invisible in loss curves until too late. Records are drawn at random (seeded) from
the keys, shown in key order, decoded through the codec exactly as the dataset decodes them, and
fitted into square tiles (small images are enlarged without smoothing, so their pixels stay visible).

An LMDB of another layout (LSUN, CRNN, ...: detected as `info` detects it, or `layout=`) is drawn
from its samples, read as `LmdbDataset` reads them (`reader.LayoutReader.read`): a pair side by
side in one tile, captioned with its target (the class name for class targets, the text, cut to
the tile, for OCR labels). A sample that cannot be read is drawn as a broken tile (a cross)
captioned with the reason, and the reason, naming the key, is listed in `Grid.problems`.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .datum import datum_to_image, parse_datum_view
from .errors import DatumError, InputError, KeysFileError
from .files import output_target_kind, write_bytes_atomic
from .inspection import tool_layout
from .labels import short_repr
from .layouts import Layout
from .reader import LayoutReader, open_layout_reader
from .safe_lmdb import get_value
from .text_targets import escape_text
from .tool_reading import class_names, format_key, keys_file_for, known_keys, label_name, random_subset, read_txn

BACKGROUND = (32, 32, 32)
TEXT = (255, 255, 255)
#: A broken tile (a sample that cannot be read): a cross on dark red.
BROKEN = (96, 0, 0)
#: A reader's message: `key b'...'`, then what is wrong with it.
_KEY_FIRST = re.compile(r"key (b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\")(?::\s*|\s+)(.*)", re.DOTALL)
#: Space around each tile and its caption, in pixels.
PAD = 4


@dataclass(frozen=True)
class Grid:
    """A contact sheet and its layout: `count` of the LMDB's `records` in `columns` x `rows` tiles.

    `path` is where `grid` saved it (None before saving). For an LMDB of another layout, `layout`
    describes it (`Layout.describe`) and `problems` has a line, naming the LMDB and the key, per
    sample drawn as a broken tile.
    """

    image: Image.Image
    count: int
    records: int
    columns: int
    rows: int
    path: Path | None = None
    layout: str | None = None
    problems: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = self.path if self.path is not None else "grid"
        if self.layout is not None:
            broken = f", {len(self.problems)} broken (listed above)" if self.problems else ""
            return (f"{where}: {self.count} of {self.records} samples ({self.layout.split(' ')[0]} layout), "
                    f"{self.columns}x{self.rows} tiles, {self.image.width}x{self.image.height} px{broken}")
        return (f"{where}: {self.count} of {self.records} records, {self.columns}x{self.rows} tiles, "
                f"{self.image.width}x{self.image.height} px")


def make_grid(
    lmdb_path: str | os.PathLike,
    n: int = 64,
    seed: int = 0,
    keys_path: str | os.PathLike | None = None,
    tile: int = 128,
    layout: str | Layout | None = None,
) -> Grid:
    """Draw `n` random records of an LMDB in a near-square grid, each captioned with its label.

    Args:
        lmdb_path: the LMDB.
        n: records to show (all of them if the LMDB has fewer).
        seed: the sampling seed; the same seed shows the same records.
        keys_path: the keys file to sample from; default the converter's, else a key-only scan.
        tile: the side of each square tile, in pixels.
        layout: read the LMDB as this layout (default: detected, as `info` does). Any layout but
            Caffe's Datums is drawn by `layout_grid` (`keys_path` is not used).

    Returns:
        The RGB contact sheet (`grid.image`) and its layout.

    Raises:
        InputError: `n` or `tile` is too small.
        LmdbFormatError: the path is not an LMDB.
        CorruptLmdbError: the LMDB is truncated or damaged (names the LMDB and the key).
        DatumError: a sampled record is not a valid Datum or does not decode (names the key).
        InputError: an unknown layout name.
    """
    if n < 1:
        raise InputError(f"the grid needs at least one sample, got n={n}")
    if tile < 16:
        raise InputError(f"tiles must be at least 16 pixels, got tile={tile}")
    other = tool_layout(lmdb_path, layout)
    if other is not None:
        return layout_grid(open_layout_reader(lmdb_path, other), n=n, seed=seed, tile=tile)
    path = Path(lmdb_path)
    classes = class_names(path)
    keys_file = keys_file_for(path, keys_path)
    with read_txn(path) as txn:
        records = txn.stat()["entries"]
        keys = random_subset(known_keys(txn, keys_file), n, seed)
        if not len(keys):
            raise InputError(f"{path}: the LMDB has no records to show")
        sheet = _Sheet(len(keys), tile)
        for i, key in enumerate(keys):
            image, label = _read(txn, path, bytes(key), keys_file)
            name = label_name(label, classes)
            sheet.place(i, image, f"{label} {name}" if name else str(label))
    return Grid(sheet.image, len(keys), records, sheet.columns, sheet.rows)


def layout_grid(reader: LayoutReader, n: int = 64, seed: int = 0, tile: int = 128) -> Grid:
    """`make_grid` of an LMDB of another layout: `n` random samples (seeded), a broken tile for each unreadable one.

    Raises:
        InputError: the LMDB has no samples.
    """
    chosen = random_subset(np.arange(len(reader)), n, seed)
    if not len(chosen):
        raise InputError(f"{reader.root}: the LMDB has no samples to show ({reader.layout.describe()})")
    classes = class_names(reader.root)
    sheet = _Sheet(len(chosen), tile)
    problems: list[str] = []
    for i, index in enumerate(chosen.tolist()):
        try:
            image, target = reader.read(index)
        except (KeysFileError, DatumError) as exc:
            problems.append(str(exc))
            named = _KEY_FIRST.match(str(exc).removeprefix(f"{reader.root}: "))  # caption: the key; tile: why
            sheet.place(i, None, named[1] if named else "unreadable", reason=named[2] if named else str(exc))
            continue
        sheet.place(i, _side_by_side(image) if isinstance(image, tuple) else image,
                    _target_caption(target, reader.layout.class_targets, classes))
    return Grid(sheet.image, len(chosen), len(reader), sheet.columns, sheet.rows, layout=reader.layout.describe(),
                problems=tuple(problems))


class _Sheet:
    """The contact sheet being drawn: `count` tiles of `tile` pixels in a near-square grid, each with a caption."""

    def __init__(self, count: int, tile: int) -> None:
        self.tile = tile
        self.font = ImageFont.load_default()
        caption_height = self.font.getbbox("Ag")[3] + PAD
        self.columns = math.ceil(math.sqrt(count))
        self.rows = math.ceil(count / self.columns)
        self.cell_w, self.cell_h = tile + PAD, tile + caption_height + PAD
        self.image = Image.new("RGB", (self.columns * self.cell_w + PAD, self.rows * self.cell_h + PAD), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)

    def place(self, i: int, image: Image.Image | None, caption: str, reason: str = "") -> None:
        """Tile `i`: `image` fitted and centred, `caption` cut to the tile below it.

        `image` None draws a broken tile: a cross, with `reason` written over its upper part.
        """
        tile = self.tile
        x, y = PAD + (i % self.columns) * self.cell_w, PAD + (i // self.columns) * self.cell_h
        if image is None:
            self.draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=BROKEN)
            self.draw.line((x, y, x + tile - 1, y + tile - 1), fill=TEXT, width=2)
            self.draw.line((x, y + tile - 1, x + tile - 1, y), fill=TEXT, width=2)
            line_height = self.font.getbbox("Ag")[3] + 1
            for row, line in enumerate(self._wrapped(reason, tile - 4)[:(tile * 3 // 4) // line_height]):
                self.draw.text((x + 2, y + 2 + row * line_height), line, fill=TEXT, font=self.font)
        else:
            fitted = _fit(image, tile)
            self.image.paste(fitted, (x + (tile - fitted.width) // 2, y + (tile - fitted.height) // 2))
        self.draw.text((x, y + tile + PAD // 2), _clip(self.draw, self.font, caption, tile), fill=TEXT, font=self.font)


    def _wrapped(self, text: str, width: int) -> list[str]:
        """`text` in lines of at most `width` pixels, broken between words (a word too long is cut)."""
        lines: list[str] = []
        for word in text.split():
            joined = f"{lines[-1]} {word}" if lines else word
            if lines and self.draw.textlength(joined, font=self.font) <= width:
                lines[-1] = joined
            else:
                lines.append(_clip(self.draw, self.font, word, width))
        return lines


def _side_by_side(images: tuple[Image.Image, ...]) -> Image.Image:
    """A sample's images (a low/high-quality pair) in one row, `PAD` apart, each at its own size."""
    width = sum(image.width for image in images) + PAD * (len(images) - 1)
    row = Image.new("RGB", (width, max(image.height for image in images)), BACKGROUND)
    x = 0
    for image in images:
        row.paste(image, (x, 0))
        x += image.width + PAD
    return row


def _target_caption(target: object, class_targets: bool, classes: list[str] | None) -> str:
    """A tile's caption: an int label with its class name, a class name, a text (escaped: one line), or the value."""
    if isinstance(target, str):
        return target if class_targets else escape_text(target)
    if isinstance(target, int | np.integer) and not isinstance(target, bool):
        name = label_name(int(target), classes)
        return f"{target} {name}" if name else str(target)
    return "no target" if target is None else short_repr(target)


def _read(txn, path: Path, key: bytes, keys_file: Path | None) -> tuple[Image.Image, int]:
    value = get_value(txn, key, path)
    if value is None:
        raise KeysFileError(f"{keys_file}: {format_key(key)} is not in the LMDB {path}")
    try:
        datum = parse_datum_view(value)
        return datum_to_image(datum, "RGB"), datum.label
    except DatumError as exc:
        raise DatumError(f"{path}: {format_key(key)}: {exc}") from None


def _fit(image: Image.Image, tile: int) -> Image.Image:
    """Scale to fit a tile, keeping the aspect ratio; enlarging uses NEAREST so small images stay crisp."""
    enlarging = image.width < tile and image.height < tile
    return ImageOps.contain(image, (tile, tile), method=Image.NEAREST if enlarging else Image.BILINEAR)


def _clip(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text`, shortened with `...` until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid(
    lmdb_path: str | os.PathLike,
    output: str | os.PathLike,
    n: int = 64,
    seed: int = 0,
    keys_path: str | os.PathLike | None = None,
    tile: int = 128,
    layout: str | Layout | None = None,
) -> Grid:
    """Draw the contact sheet (see `make_grid`) and save it; the format follows the file extension.

    The image is encoded in memory and written by `files.write_bytes_atomic`, so a failed write
    (a full disk) leaves no half image behind, and an existing file is replaced whole or kept.

    Raises:
        As `make_grid`; InputError if the extension is not an image format Pillow writes;
        OutputPathError if `output` is a folder or a special file `files.write_bytes_atomic` refuses.
    """
    output = Path(output)
    image_format = Image.registered_extensions().get(output.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise InputError(f"{output}: cannot save the grid there (unknown image extension {output.suffix!r})")
    output_target_kind(output)  # a folder or a refused special file: before any record is read
    grid = make_grid(lmdb_path, n=n, seed=seed, keys_path=keys_path, tile=tile, layout=layout)
    buffer = io.BytesIO()
    try:
        grid.image.save(buffer, format=image_format)
    except (ValueError, OSError) as exc:  # a format that cannot hold an RGB image
        raise InputError(f"{output}: cannot save the grid as {image_format} ({exc})") from None
    try:
        write_bytes_atomic(output, buffer.getbuffer())
    except OSError as exc:
        if exc.filename is None:  # a failed write (full disk) names no file: name the output
            raise OSError(exc.errno, exc.strerror, os.fspath(output)) from None
        raise
    return replace(grid, path=output)
