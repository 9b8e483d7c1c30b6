"""One record from one image: Caffe's `convert_imageset` flags and what they do to a file's bytes.

Everything that turns image files into Datum records goes through here: `convert` (in its worker
processes) and `migrate` (for legacy records holding file bytes), so both apply one rule for when a
file's bytes are stored unchanged (no resize, no gray conversion of a colour file, the same format,
one Caffe can decode, and the bytes pass an integrity check; `--gray` alone keeps them too, as in
Caffe) and one set of decoding conventions.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .datum import (
    DatumError,
    encode_image,
    encoded_to_datum,
    is_passthrough_format,
    pil_format,
    raw_datum_parts,
    serialize_datum,
)
from .errors import InputError, os_error_reason
from .image_files import DECODE_ERRORS, decode_failure, exif_orientation, load_image, open_image, require_image_data
from .sources import Entry, FileInput, read_image_file
from .workers import Record


@dataclass(frozen=True)
class ConvertOptions:
    """What each record looks like: Caffe's `convert_imageset` flags, with the same meaning.

    Attributes:
        gray: store one-channel (L) images.
        resize_height, resize_width: resize to this size when both are > 0 (aspect ratio not kept).
        resize_backend: "pillow" (bilinear with antialiasing) or "opencv" (`cv2.resize` with
            `INTER_LINEAR`, Caffe's own call: pixel parity with Caffe built on the same OpenCV;
            needs `opencv-python-headless`, which caffe-lmdb does not install).
        encoded: store image file bytes instead of raw planar pixels.
        encode_type: the file format of encoded records (jpg, png, ...); "" keeps each file's own
            bytes when nothing would change them. A non-empty value implies `encoded`.
        check_size: require every record to have the same channels x height x width.
        reencode_gray: with `encoded` and `gray`, decode colour files to gray and store them
            re-encoded as one-channel images (`--reencode-gray`). Off by default: Caffe's
            `convert_imageset --encoded --gray` keeps every file's bytes (the re-encode test at
            io.cpp:125 is always true with `--gray`), and its data layer decodes them to gray
            when it reads them.
        fast_resize: with a resize, decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that
            is still at least twice the target, then resize (`--fast-resize`): big photos convert
            much faster, with pixels close to, not equal to, a full decode's (docs/converting.md).
    """

    gray: bool = False
    resize_height: int = 0
    resize_width: int = 0
    resize_backend: str = "pillow"
    encoded: bool = False
    encode_type: str = ""
    check_size: bool = False
    reencode_gray: bool = False
    fast_resize: bool = False

    def __post_init__(self) -> None:
        if self.fast_resize and not (self.resize_height > 0 and self.resize_width > 0):
            raise InputError("--fast-resize needs a resize (--resize_height and --resize_width)")
        if (self.resize_height > 0) != (self.resize_width > 0):
            raise InputError(
                f"resize needs both sides > 0, got resize_height={self.resize_height} "
                f"resize_width={self.resize_width}"
            )
        if self.resize_height < 0 or self.resize_width < 0:
            raise InputError("resize sizes must be >= 0")
        if self.resize_backend not in ("pillow", "opencv"):
            raise InputError(f"resize backend must be 'pillow' or 'opencv', got {self.resize_backend!r}")
        if self.resize_backend == "opencv":
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise InputError(
                    "--resize-backend opencv needs OpenCV's Python package: pip install opencv-python-headless"
                ) from None
        if self.reencode_gray and not (self.gray and self.stores_encoded):
            raise InputError("--reencode-gray needs --gray and --encoded (or --encode_type)")
        if self.encode_type:
            try:
                pil_format(self.encode_type)
            except ValueError as exc:
                raise InputError(str(exc)) from None

    @property
    def resize(self) -> tuple[int, int] | None:
        """(width, height) to resize to, or None."""
        return (self.resize_width, self.resize_height) if self.resize_height > 0 else None

    @property
    def decode_at_least(self) -> tuple[int, int] | None:
        """(width, height) a JPEG may be decoded down to before the resize (`fast_resize`: twice the target)."""
        return (2 * self.resize_width, 2 * self.resize_height) if self.fast_resize else None

    @property
    def stores_encoded(self) -> bool:
        return self.encoded or bool(self.encode_type)



def _check_structure(image: Image.Image, data: bytes) -> None:
    """Cheap integrity checks for bytes stored unchanged: a truncated file must not pass.

    A full decode would make encoded conversion as slow as raw, so JPEGs are checked for their
    end-of-image marker (decoded in full only if it is missing), PNGs by their chunk CRCs, and
    other formats decoded.
    """
    if image.format == "JPEG" and data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return
    if image.format == "PNG":
        with Image.open(io.BytesIO(data)) as fresh:  # verify() must directly follow open()
            fresh.verify()
        return
    image.load()


def resize_image(image: Image.Image, options: ConvertOptions) -> Image.Image:
    """Resize to `options.resize` as Caffe's `convert_imageset` would (see `resize_backend`).

    Pillow's bilinear filter low-passes when shrinking (antialiasing); OpenCV's INTER_LINEAR,
    which Caffe calls, samples the 2x2 nearest source pixels only. Downscaled pixels therefore
    differ by a few levels between the two; "opencv" calls `cv2.resize` itself for parity.
    """
    if options.resize_backend == "opencv":
        import cv2

        resized = cv2.resize(np.asarray(image), options.resize, interpolation=cv2.INTER_LINEAR)
        return Image.fromarray(resized, mode=image.mode)
    return image.resize(options.resize, Image.BILINEAR)


def build_record(data: bytes, label: int, targets: Sequence[float], options: ConvertOptions) -> Record:
    """Turn one image file's bytes into a serialized Datum, as `convert_imageset` would.

    Raises:
        DatumError: the bytes are not an image that can be converted (the message says why).
    """
    if not data:
        raise DatumError("file is empty")
    if options.stores_encoded:
        payload, shape, _ = encoded_payload(data, options)
        datum = encoded_to_datum(payload, label)
        if targets:
            datum.float_data.extend(targets)
        return Record((serialize_datum(datum),), shape)
    image = open_image(data, gray=options.gray, at_least=options.decode_at_least)
    if options.resize:
        image = resize_image(image, options)
    width, height = image.size
    parts = raw_datum_parts(image, label, gray=options.gray, float_data=targets)
    return Record(parts, (1 if options.gray else 3, height, width))


def encoded_payload(data: bytes, options: ConvertOptions) -> tuple[bytes, tuple[int, int, int], bool]:
    """What an encoded record stores for a file's bytes: (payload, C x H x W, whether the bytes were kept).

    The one pass-through rule: the bytes are kept unchanged when there is no resize, the format
    is the one asked for and one Caffe can decode, and they pass an integrity check
    (`_check_structure`: a truncated file is never stored as is). `gray` alone keeps them too,
    as `convert_imageset` does, unless `reencode_gray` asks for colour files to be stored gray.
    Anything else is decoded (gray as `imread(IMREAD_GRAYSCALE)` with `gray`), resized, and
    re-encoded, as Caffe re-encodes the image it read.

    Raises:
        DatumError: the bytes are not an image Pillow can decode.
    """
    channels = 1 if options.gray else 3
    try:
        with Image.open(io.BytesIO(data)) as image:
            require_image_data(image)
            fmt, (width, height), mode = image.format, image.size, image.mode
            wanted = pil_format(options.encode_type) if options.encode_type else fmt
            keep_bytes = (
                options.resize is None
                and is_passthrough_format(fmt)
                and wanted == fmt
                and not (options.gray and options.reencode_gray and mode != "L")
            )
            if keep_bytes:
                _check_structure(image, data)
                # OpenCV decodes with the EXIF orientation applied: rotated files have swapped dims.
                # Only --check_size needs the dims, so only then is the EXIF block parsed.
                if options.check_size and exif_orientation(image) in (5, 6, 7, 8):
                    width, height = height, width
                return data, (channels, height, width), True
            decoded = load_image(image, gray=options.gray, at_least=options.decode_at_least)
    except DatumError as exc:
        raise DatumError(f"cannot decode image bytes ({len(data)} bytes): {exc}") from None
    except Image.DecompressionBombError as exc:
        raise DatumError(f"cannot decode image bytes ({len(data)} bytes): {exc}") from None
    except DECODE_ERRORS as exc:
        raise DatumError(f"cannot decode image bytes ({len(data)} bytes): {decode_failure(exc)}") from None
    if options.resize:
        decoded = resize_image(decoded, options)
    target_type = options.encode_type or ("png" if not is_passthrough_format(wanted) else wanted.lower())
    width, height = decoded.size
    return encode_image(decoded, target_type), (channels, height, width), False


def encode_entry(entry: Entry | FileInput, options: ConvertOptions) -> Record:
    """Read and convert one entry; unreadable images come back as a `Record` with `error` set.

    Only regular files of bounded size are read (`sources.read_image_file`): a FIFO, a device
    such as a link to /dev/zero, or a folder (the scan lists unreadable folders as entries, so
    they are reported like unreadable files) is skipped with the reason, never converted.
    """
    try:
        data = read_image_file(entry.path)
        return build_record(data, entry.label, entry.targets, options)
    except DatumError as exc:
        return Record(error=str(exc))
    except OSError as exc:
        return Record(error=os_error_reason(exc))
