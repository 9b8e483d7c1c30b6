"""The one table of image formats: Pillow's names, magic numbers on real files, and what is derived from it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, features

from caffe_lmdb import datum, exporting, formats, migration, sources
from caffe_lmdb.formats import IMAGE_FORMATS, sniff_image_format, suffix_for

SNIFFED = [fmt for fmt in IMAGE_FORMATS if fmt.magic is not None]


def _file_bytes(pil_format: str, mode: str = "RGB") -> bytes:
    if pil_format == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    buf = io.BytesIO()
    Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)).convert(mode).save(buf, format=pil_format)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", SNIFFED, ids=lambda fmt: fmt.name)
def test_files_pillow_writes_are_sniffed_as_the_format_pillow_reads_them_as(fmt):
    data = _file_bytes(fmt.name)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt.name
    assert sniff_image_format(data) == fmt.name
    assert sniff_image_format(memoryview(data)[:16]) == fmt.name


def test_gray_netpbm_is_ppm_and_other_bytes_are_no_format():
    assert sniff_image_format(_file_bytes("PPM", "L")) == "PPM"  # a .pgm file: P5
    for data in (b"", b"P7 332\n", b"RIFF\x00\x00\x00\x00WAVE", b"BZh91AY", b"\x80\x04\x95"):
        assert sniff_image_format(data) is None, data


def test_derived_lists():
    assert formats.IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
                                        ".gif")
    assert ".jp2" not in formats.IMAGE_EXTENSIONS  # known for export, not read by convert
    assert "gif" not in formats.ENCODE_FORMATS and formats.ENCODE_FORMATS["pgm"] == "PPM"
    assert sorted(formats.CAFFE_FORMATS) == ["BMP", "JPEG", "PNG", "PPM", "TIFF", "WEBP"]
    assert not datum.is_passthrough_format("GIF") and datum.is_passthrough_format("TIFF")
    assert [suffix_for(name) for name in ("JPEG", "TIFF", "JPEG2000", "GIF", "MPO")] == [
        ".jpg", ".tif", ".jp2", ".gif", ".mpo"]


def test_every_module_reads_the_one_table():
    assert sources.IMAGE_EXTENSIONS is formats.IMAGE_EXTENSIONS
    assert datum.ENCODE_FORMATS is exporting.ENCODE_FORMATS is formats.ENCODE_FORMATS
    assert migration.sniff_image_format is sniff_image_format
