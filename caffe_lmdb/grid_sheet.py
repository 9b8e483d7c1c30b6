"""A contact sheet of random records with their labels: the quickest check of colours and labels.

A BGR/RGB mix-up shows as blue faces and orange skies, a label shift as the wrong class name under
a tile; both are invisible in loss curves until too late. Records are drawn at random (seeded) from
the keys, shown in key order, decoded through the codec exactly as the dataset decodes them, and
fitted into square tiles (small images are enlarged without smoothing, so their pixels stay visible).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .datum import datum_to_image, parse_datum_view
from .errors import DatumError, InputError, KeysFileError
from .files import output_target_kind, write_bytes_atomic
from .safe_lmdb import get_value
from .tool_reading import class_names, format_key, keys_file_for, known_keys, label_name, random_subset, read_txn

BACKGROUND = (32, 32, 32)
TEXT = (255, 255, 255)
#: Space around each tile and its caption, in pixels.
PAD = 4


@dataclass(frozen=True)
class Grid:
    """A contact sheet and its layout: `count` of the LMDB's `records` in `columns` x `rows` tiles.

    `path` is where `grid` saved it (None before saving).
    """

    image: Image.Image
    count: int
    records: int
    columns: int
    rows: int
    path: Path | None = None

    def __str__(self) -> str:
        where = self.path if self.path is not None else "grid"
        return (f"{where}: {self.count} of {self.records} records, {self.columns}x{self.rows} tiles, "
                f"{self.image.width}x{self.image.height} px")


def make_grid(
    lmdb_path: str | os.PathLike,
    n: int = 64,
    seed: int = 0,
    keys_path: str | os.PathLike | None = None,
    tile: int = 128,
) -> Grid:
    """Draw `n` random records of an LMDB in a near-square grid, each captioned with its label.

    Args:
        lmdb_path: the LMDB.
        n: records to show (all of them if the LMDB has fewer).
        seed: the sampling seed; the same seed shows the same records.
        keys_path: the keys file to sample from; default the converter's, else a key-only scan.
        tile: the side of each square tile, in pixels.

    Returns:
        The RGB contact sheet (`grid.image`) and its layout.

    Raises:
        InputError: `n` or `tile` is too small.
        LmdbFormatError: the path is not an LMDB.
        CorruptLmdbError: the LMDB is truncated or damaged (names the LMDB and the key).
        DatumError: a sampled record is not a valid Datum or does not decode (names the key).
    """
    if n < 1:
        raise InputError(f"the grid needs at least one sample, got n={n}")
    if tile < 16:
        raise InputError(f"tiles must be at least 16 pixels, got tile={tile}")
    path = Path(lmdb_path)
    classes = class_names(path)
    font = ImageFont.load_default()
    caption_height = font.getbbox("Ag")[3] + PAD
    keys_file = keys_file_for(path, keys_path)
    with read_txn(path) as txn:
        records = txn.stat()["entries"]
        keys = random_subset(known_keys(txn, keys_file), n, seed)
        if not len(keys):
            raise InputError(f"{path}: the LMDB has no records to show")
        columns = math.ceil(math.sqrt(len(keys)))
        rows = math.ceil(len(keys) / columns)
        cell_w, cell_h = tile + PAD, tile + caption_height + PAD
        sheet = Image.new("RGB", (columns * cell_w + PAD, rows * cell_h + PAD), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        for i, key in enumerate(keys):
            image, label = _read(txn, path, bytes(key), keys_file)
            x, y = PAD + (i % columns) * cell_w, PAD + (i // columns) * cell_h
            fitted = _fit(image, tile)
            sheet.paste(fitted, (x + (tile - fitted.width) // 2, y + (tile - fitted.height) // 2))
            name = label_name(label, classes)
            caption = _clip(draw, font, f"{label} {name}" if name else str(label), tile)
            draw.text((x, y + tile + PAD // 2), caption, fill=TEXT, font=font)
    return Grid(sheet, len(keys), records, columns, rows)


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
    grid = make_grid(lmdb_path, n=n, seed=seed, keys_path=keys_path, tile=tile)
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
