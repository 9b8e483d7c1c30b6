"""The Datum codec: pixel-exact round trips, Caffe's wire bytes, planar BGR, and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import png_bytes, unreadable_exif
from PIL import Image
from wire import field_bytes, field_float, field_varint, packed_floats, tag, varint

from caffe_lmdb import (
    Datum,
    DatumError,
    DatumView,
    array_to_datum,
    check_datum,
    datum_to_array,
    datum_to_encoded,
    datum_to_image,
    datum_to_image_array,
    encoded_to_datum,
    image_to_datum,
    open_image,
    parse_datum,
    parse_datum_view,
    serialize_datum,
)
from caffe_lmdb.datum import RawRecordLayout, image_to_datum_bytes, read_encoded_header
from caffe_lmdb.encode import ConvertOptions, encoded_payload


def roundtrip(datum: Datum) -> Datum:
    return parse_datum(serialize_datum(datum))


# ---------------------------------------------------------------- round trips, pixel-exact

def test_rgb_roundtrip_is_pixel_exact(rgb_image):
    back = datum_to_image(roundtrip(image_to_datum(rgb_image, label=4)))
    assert back.mode == "RGB" and back.size == (7, 5)
    assert np.array_equal(np.asarray(back), np.asarray(rgb_image))


def test_gray_roundtrip_is_pixel_exact(gray_image):
    datum = roundtrip(image_to_datum(gray_image, gray=True))
    assert (datum.channels, datum.height, datum.width) == (1, 5, 7)
    back = datum_to_image(datum)
    assert back.mode == "L"
    assert np.array_equal(np.asarray(back), np.asarray(gray_image))


def test_gray_source_without_gray_flag_becomes_three_equal_planes(gray_image):
    arr = datum_to_array(image_to_datum(gray_image))
    assert arr.shape == (3, 5, 7)
    assert np.array_equal(arr[0], arr[1]) and np.array_equal(arr[1], arr[2])
    assert np.array_equal(arr[0], np.asarray(gray_image))


def test_encoded_roundtrip_keeps_bytes_and_pixels(rgb_image):
    payload = png_bytes(rgb_image)
    datum = roundtrip(encoded_to_datum(payload, label=2))
    assert datum.encoded and datum.data == payload and datum.label == 2
    assert (datum.channels, datum.height, datum.width) == (0, 0, 0)
    assert datum_to_encoded(datum) == payload
    assert np.array_equal(np.asarray(datum_to_image(datum)), np.asarray(rgb_image))


def test_encoded_gray_png_decodes_to_l_mode(gray_image):
    datum = encoded_to_datum(png_bytes(gray_image))
    back = datum_to_image(datum)
    assert back.mode == "L"
    assert np.array_equal(np.asarray(back), np.asarray(gray_image))
    assert datum_to_image(datum, mode="RGB").mode == "RGB"


def test_encoded_array_is_bgr_chw_like_caffe(rgb_image):
    arr = datum_to_array(encoded_to_datum(png_bytes(rgb_image)))
    assert arr.shape == (3, 5, 7)
    assert np.array_equal(arr, np.asarray(rgb_image)[:, :, ::-1].transpose(2, 0, 1))


def test_array_roundtrip_uint8_and_float(rng):
    chw = rng.integers(0, 256, size=(3, 4, 6), dtype=np.uint8)
    assert np.array_equal(datum_to_array(roundtrip(array_to_datum(chw, label=1))), chw)
    floats = rng.normal(size=(2, 3, 5)).astype(np.float32)
    datum = roundtrip(array_to_datum(floats))
    assert datum.data == b"" and len(datum.float_data) == 30
    back = datum_to_array(datum)
    assert back.dtype == np.float64 and np.array_equal(back, floats)  # pycaffe's float64, values exact
    assert datum_to_array(datum, copy=False).dtype == np.float32


def test_raw_array_is_writable_by_default_and_a_view_with_copy_false(rgb_image):
    datum = image_to_datum(rgb_image)
    arr = datum_to_array(datum)
    arr -= 1  # pycaffe's datum_to_array returns a new array: `arr -= mean` works
    assert arr.flags.writeable and arr.flags.owndata
    view = datum_to_array(datum, copy=False)
    assert not view.flags.writeable  # np.frombuffer over the Datum's bytes
    assert np.array_equal(view, arr + 1)


def test_real_photos_roundtrip(shared_images):
    for name in ("chelsea.png", "rocket.jpg", "camera.png", "logo.png"):
        image = open_image(shared_images / name)
        assert image.mode == "RGB"  # gray and RGBA sources normalised as OpenCV's IMREAD_COLOR
        back = datum_to_image(roundtrip(image_to_datum(image)))
        assert np.array_equal(np.asarray(back), np.asarray(image)), name


# ---------------------------------------------------------------- layout

def test_pure_red_is_stored_in_the_third_plane():
    red = Image.new("RGB", (7, 5), (255, 0, 0))
    datum = image_to_datum(red)
    plane = 5 * 7
    assert datum.data[:plane] == bytes(plane)  # B
    assert datum.data[plane:2 * plane] == bytes(plane)  # G
    assert datum.data[2 * plane:] == b"\xff" * plane  # R


def test_rows_are_height_and_columns_width():
    arr = np.zeros((5, 7, 3), dtype=np.uint8)
    arr[1, 6] = (10, 20, 30)  # row 1, column 6
    datum = image_to_datum(Image.fromarray(arr))
    chw = np.frombuffer(datum.data, np.uint8).reshape(3, 5, 7)
    assert tuple(chw[:, 1, 6]) == (30, 20, 10)


# ---------------------------------------------------------------- wire compatibility

def test_raw_datum_bytes_match_hand_assembled_wire_format():
    pixels = bytes(range(3 * 2 * 4))
    datum = array_to_datum(np.frombuffer(pixels, np.uint8).reshape(3, 2, 4), label=7)
    expected = (
        field_varint(1, 3) + field_varint(2, 2) + field_varint(3, 4)
        + field_bytes(4, pixels) + field_varint(5, 7) + field_varint(7, 0)
    )
    assert serialize_datum(datum) == expected
    assert serialize_datum(datum).endswith(b"\x28\x07\x38\x00")  # label and encoded=false explicit


def test_label_zero_and_negative_are_written_explicitly():
    zero = serialize_datum(array_to_datum(np.zeros((1, 1, 1), np.uint8), label=0))
    assert zero.endswith(field_varint(5, 0) + field_varint(7, 0))
    negative = serialize_datum(array_to_datum(np.zeros((1, 1, 1), np.uint8), label=-1))
    assert field_varint(5, -1) in negative and len(field_varint(5, -1)) == 11


def test_encoded_datum_bytes_match_hand_assembled_wire_format():
    payload = b"\x89PNG fake payload"
    assert serialize_datum(encoded_to_datum(payload, label=300)) == (
        field_bytes(4, payload) + field_varint(5, 300) + field_varint(7, 1)
    )


def test_float_data_is_not_packed():
    datum = array_to_datum(np.array([[[1.5, -2.0]]], dtype=np.float32), label=1)
    expected = (
        field_varint(1, 1) + field_varint(2, 1) + field_varint(3, 2) + field_varint(5, 1)
        + field_float(6, 1.5) + field_float(6, -2.0) + field_varint(7, 0)
    )
    assert serialize_datum(datum) == expected


def test_hand_assembled_caffe_bytes_parse():
    blob = field_varint(1, 3) + field_varint(2, 1) + field_varint(3, 1) + field_bytes(4, b"\x01\x02\x03") \
        + field_varint(5, 9) + field_varint(7, 0)
    datum = parse_datum(blob)
    assert datum.label == 9 and not datum.encoded
    assert tuple(datum_to_image(datum).getpixel((0, 0))) == (3, 2, 1)  # BGR stored, RGB read


# ---------------------------------------------------------------- malformed records

@pytest.mark.parametrize(
    ("datum", "message"),
    [
        (Datum(channels=3, height=256, width=256, data=bytes(1000)), "data has 1000 bytes, channels*height*width = 3*256*256 = 196608"),
        (Datum(channels=0, height=5, width=7, data=bytes(35)), "invalid dims channels=0, height=5, width=7"),
        (Datum(channels=3, height=-5, width=7, data=bytes(105)), "invalid dims channels=3, height=-5"),
        (Datum(channels=3, height=5, width=7), "neither data nor float_data"),
        (Datum(encoded=True), "encoded datum has empty data"),
    ],
)
def test_malformed_datums_raise_clear_errors(datum, message):
    with pytest.raises(DatumError, match=message.replace("*", r"\*")):
        check_datum(datum)
    with pytest.raises(DatumError, match=message.replace("*", r"\*")):
        datum_to_image(roundtrip(datum))


def test_short_float_data_is_an_error():
    datum = Datum(channels=1, height=2, width=2)
    datum.float_data.extend([1.0, 2.0])
    with pytest.raises(DatumError, match="2 float_data values, channels\\*height\\*width = 1\\*2\\*2 = 4"):
        datum_to_array(datum)


def test_encoded_garbage_is_a_clear_error():
    with pytest.raises(DatumError, match="cannot decode image bytes \\(7 bytes\\)"):
        datum_to_image(encoded_to_datum(b"garbage"))


def test_truncated_jpeg_is_a_clear_error(rgb_image):
    buf = io.BytesIO()
    rgb_image.resize((64, 64)).save(buf, format="JPEG")
    with pytest.raises(DatumError, match="cannot decode"):
        datum_to_image(encoded_to_datum(buf.getvalue()[:100]))


def test_bytes_that_are_not_a_datum():
    with pytest.raises(DatumError, match="not a Datum"):
        parse_datum(b"\xff\xff\xff\xff")
    with pytest.raises(DatumError, match="not a Datum"):
        parse_datum(field_varint(15, 1))  # a well-formed message, but not a Datum's field


def test_isinstance_value_error():
    assert issubclass(DatumError, ValueError)


# ---------------------------------------------------------------- zero-copy parse: same answer as protobuf


def parsed_fields(parse, buf: bytes):
    """What a parser makes of `buf`: every field's value, or "DatumError"."""
    try:
        datum = parse(buf)
    except DatumError:
        return "DatumError"
    floats = np.asarray(datum.float_data, dtype=np.float32).tobytes()  # bitwise, so NaNs compare
    return (datum.channels, datum.height, datum.width, bytes(datum.data), datum.label, floats, bool(datum.encoded))


def random_datum_bytes(rng: np.random.Generator) -> bytes:
    """Wire bytes mixing what Caffe, pycaffe and other writers emit, then sometimes damaged."""
    parts = []
    for _ in range(rng.integers(0, 9)):
        kind = rng.random()
        if kind < 0.45:
            field = int(rng.choice([1, 2, 3, 5, 7]))
            value = int(rng.choice([0, 1, 7, 255, 300, -1, -2**31, 2**31 - 1, 2**40 + 3, -(2**50)]))
            parts.append(field_varint(field, value))
        elif kind < 0.6:
            parts.append(field_bytes(4, rng.bytes(int(rng.integers(0, 40)))))
        elif kind < 0.72:  # unpacked, as Caffe writes repeated floats
            parts += [field_float(6, float(v)) for v in rng.normal(0, 1e3, size=rng.integers(1, 6))]
        elif kind < 0.8:
            parts.append(packed_floats(6, rng.normal(size=rng.integers(0, 5)).tolist()))
        elif kind < 0.85:
            parts.append(b"\x88\x80\x80\x80\x00" + varint(int(rng.integers(0, 9))))  # channels, 5-byte tag
        elif kind < 0.9:
            parts.append(field_varint(int(rng.integers(8, 40)), 1))  # a field a Datum does not have
        elif kind < 0.95:
            parts.append(tag(int(rng.integers(1, 8)), int(rng.integers(0, 8))))  # any wire type
        else:
            parts.append(rng.bytes(int(rng.integers(1, 4))))
    buf = bytearray(b"".join(parts))
    damage = rng.random()
    if buf and damage < 0.15:
        del buf[int(rng.integers(0, len(buf))):]
    elif buf and damage < 0.3:
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
    elif damage < 0.35:
        buf = bytearray(rng.bytes(int(rng.integers(0, 12))))
    return bytes(buf)


def test_view_parse_agrees_with_protobuf_on_many_records(rng):
    outcomes = {"ok": 0, "DatumError": 0}
    for _ in range(5000):
        buf = random_datum_bytes(rng)
        expected = parsed_fields(parse_datum, buf)
        assert parsed_fields(parse_datum_view, buf) == expected, buf.hex()
        outcomes["DatumError" if expected == "DatumError" else "ok"] += 1
    assert min(outcomes.values()) > 1000  # both sides of the boundary were exercised


def test_view_parse_agrees_with_protobuf_on_every_two_byte_string():
    for value in range(1 << 16):
        buf = value.to_bytes(2, "little")
        assert parsed_fields(parse_datum_view, buf) == parsed_fields(parse_datum, buf), buf.hex()


@pytest.mark.parametrize("label", [0, 9, -1, -2**31, 2**31 - 1])
def test_view_parse_of_caffe_records(rgb_image, label):
    raw = serialize_datum(image_to_datum(rgb_image, label=label))
    encoded = encoded_to_datum(png_bytes(rgb_image), label=label)
    encoded.float_data.extend([0.25, -3.5, float("inf")])
    floats = array_to_datum(np.arange(105, dtype=np.float32).reshape(3, 5, 7) - 50, label=label)
    for buf in (raw, serialize_datum(encoded), serialize_datum(floats)):
        view = parse_datum_view(buf)
        assert isinstance(view, DatumView) and view.label == label
        assert parsed_fields(parse_datum_view, buf) == parsed_fields(parse_datum, buf)


def test_view_data_shares_memory_with_the_buffer(rgb_image):
    buf = bytearray(serialize_datum(image_to_datum(rgb_image)))
    view = parse_datum_view(memoryview(buf))
    assert isinstance(view.data, memoryview) and len(view.data) == 105
    assert np.shares_memory(np.frombuffer(view.data, np.uint8), np.frombuffer(buf, np.uint8))
    assert view.float_data.dtype == np.float32 and view.float_data.flags.writeable


def test_view_parse_of_a_large_unpacked_float_datum():
    chw = np.random.default_rng(5).normal(size=(3, 64, 48)).astype(np.float32)
    view = parse_datum_view(serialize_datum(array_to_datum(chw, label=2)))
    assert not np.shares_memory(view.float_data, chw)
    assert np.array_equal(view.float_data, chw.ravel()) and view.data == b"" and view.label == 2


def test_view_parse_refuses_what_is_not_a_datum():
    for buf, reason in [
        (b"\xff\xff\xff\xff", "truncated"),
        (field_varint(15, 1), "field 15 with wire type 0 at byte 0 is not a Datum field"),
        (tag(4, 2) + varint(10) + b"abc", "runs 7 bytes past the end"),
        (field_bytes(6, b"\x00" * 5), "not a multiple of 4"),
        (tag(1, 2) + varint(1) + b"x", "field 1 with wire type 2"),
        (tag(1, 0) + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    ]:
        with pytest.raises(DatumError, match=f"not a Datum \\({len(buf)} bytes.*{reason}"):
            parse_datum_view(buf)


def test_codec_functions_accept_a_view(rgb_image):
    buf = serialize_datum(image_to_datum(rgb_image, label=3))
    view = parse_datum_view(buf)
    check_datum(view)
    assert np.array_equal(np.asarray(datum_to_image(view)), np.asarray(rgb_image))
    assert np.array_equal(datum_to_array(view), datum_to_array(parse_datum(buf)))
    with pytest.raises(DatumError, match="data has 104 bytes"):
        check_datum(parse_datum_view(serialize_datum(Datum(channels=3, height=5, width=7, data=bytes(104)))))


# ---------------------------------------------------------------- C x H x W arrays of the image, RGB order


def image_chw(image: Image.Image) -> np.ndarray:
    hwc = np.asarray(image)
    return hwc[np.newaxis] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)


def test_image_array_is_the_image_as_chw(rgb_image, gray_image):
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(5, 7, 4), dtype=np.uint8), "RGBA")
    raw_rgba = Datum(channels=4, height=5, width=7, label=0, encoded=False)
    raw_rgba.data = np.asarray(rgba)[:, :, [2, 1, 0, 3]].transpose(2, 0, 1).tobytes()  # BGRA planes
    cases = [
        image_to_datum(rgb_image),
        image_to_datum(gray_image, gray=True),
        raw_rgba,
        encoded_to_datum(png_bytes(rgb_image)),
        encoded_to_datum(png_bytes(gray_image)),
    ]
    for datum in cases:
        for parsed in (datum, parse_datum_view(serialize_datum(datum))):
            for mode in (None, "RGB", "L"):
                array = datum_to_image_array(parsed, mode)
                assert array.dtype == np.uint8 and array.flags.writeable and array.flags.c_contiguous
                assert np.array_equal(array, image_chw(datum_to_image(datum, mode))), (datum.channels, mode)


def test_image_array_copies_out_of_the_buffer(rgb_image):
    buf = bytearray(serialize_datum(image_to_datum(rgb_image)))
    array = datum_to_image_array(parse_datum_view(buf))
    assert not np.shares_memory(array, np.frombuffer(buf, np.uint8))
    buf[:] = bytes(len(buf))  # an LMDB page reused after the transaction
    assert np.array_equal(array, np.asarray(rgb_image).transpose(2, 0, 1))


def test_image_array_of_float_datums_keeps_values_in_rgb_order():
    bgr = np.arange(105, dtype=np.float32).reshape(3, 5, 7) * 3.5 - 100
    array = datum_to_image_array(parse_datum_view(serialize_datum(array_to_datum(bgr))))
    assert array.dtype == np.float32 and np.array_equal(array, bgr[::-1])
    gray = datum_to_image_array(array_to_datum(bgr[:1]), mode="RGB")
    assert gray.shape == (3, 5, 7) and all(np.array_equal(plane, bgr[0]) for plane in gray)


def test_image_array_keeps_other_channel_counts_in_stored_order():
    planes = np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7)
    assert np.array_equal(datum_to_image_array(array_to_datum(planes)), planes)
    with pytest.raises(DatumError, match="2 channels"):
        datum_to_image_array(array_to_datum(planes), mode="RGB")


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize(("label", "floats"), [(0, ()), (-5, (1.5, 0.1)), (300, (3.0,))])
def test_image_to_datum_bytes_equals_protobuf_serialization(rgb_image, gray, label, floats):
    from caffe_lmdb.datum import image_to_datum_bytes

    for image in (rgb_image, rgb_image.resize((300, 200))):
        expected = image_to_datum(image, label, gray=gray)
        expected.float_data.extend(floats)
        assert bytes(image_to_datum_bytes(image, label, gray=gray, float_data=floats)) == serialize_datum(expected)


# ---------------------------------------------------------------- decompression bombs

def bomb_png(width: int, height: int) -> bytes:
    """A real PNG, assembled chunk by chunk, whose IHDR claims width x height RGB over a 100-byte IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def bomb_jpeg(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 frame header is rewritten to claim width x height."""
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)  # marker, length (2), precision (1), then H, W
    return bytes(data)


@pytest.mark.parametrize("make", [bomb_png, bomb_jpeg])
def test_decompression_bomb_header_is_a_datum_error_naming_the_size(make):
    payload = make(30000, 30000)
    assert len(payload) < 1000
    with Image.open(io.BytesIO(bomb_png(3, 2))) as small:  # the builder makes a header Pillow reads
        assert small.size == (3, 2)
    datum = encoded_to_datum(payload)
    calls = [lambda: read_encoded_header(payload), lambda: open_image(payload), lambda: datum_to_image(datum),
             lambda: datum_to_image_array(datum), lambda: datum_to_array(datum)]
    for call in calls:
        with pytest.raises(DatumError, match="claims a 30000x30000 .*decompression bomb"):
            call()


def test_decompression_bomb_warning_raised_as_error_is_a_datum_error():
    payload = bomb_png(10000, 10000)  # over MAX_IMAGE_PIXELS, under twice it: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        assert read_encoded_header(payload)[1:4] == (3, 10000, 10000)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DatumError, match="claims a 10000x10000"):
            read_encoded_header(payload)
        with pytest.raises(DatumError, match="claims a 10000x10000"):
            open_image(payload)


def test_info_and_verify_report_a_bomb_record_as_a_finding(tmp_path, capsys):
    from conftest import caffe_key, write_lmdb

    from caffe_lmdb import caffe_pb2
    from caffe_lmdb.cli import main

    good = caffe_pb2.Datum(data=png_bytes(Image.new("RGB", (3, 2))), label=0, encoded=True)
    bomb = caffe_pb2.Datum(data=bomb_png(30000, 30000), label=1, encoded=True)
    path = write_lmdb(tmp_path / "bomb.lmdb", {caffe_key(0, "a.png"): good.SerializeToString(),
                                               caffe_key(1, "bomb.png"): bomb.SerializeToString()})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "encoded formats: PNG 1, unknown 1" in out
    assert main(["verify", "--decode", str(path), "-q"]) == 1
    out = capsys.readouterr().out
    assert "key b'00000001_bomb.png'" in out and "claims a 30000x30000" in out


def test_png_header_read_decodes_nothing_and_keeps_exif_orientation(rgb_image):
    """A PNG's header is read without its pixels: a 10000x10000 claim over 100 bytes of IDAT gives its dims."""
    with pytest.warns(Image.DecompressionBombWarning):
        header = read_encoded_header(bomb_png(10000, 10000))  # decoding would fail: the IDAT is 100 bytes
    assert (header.format, header.channels, header.height, header.width) == ("PNG", 3, 10000, 10000)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: 7 wide x 5 high decodes 5 wide x 7 high
    buf = io.BytesIO()
    rgb_image.save(buf, format="PNG", exif=exif)  # Pillow writes eXIf before IDAT
    assert read_encoded_header(buf.getvalue())[1:] == (3, 7, 5, 6)


# ---------------------------------------------------------------- the loader's raw-record fast path


def _raw_record_tail(rng: np.random.Generator) -> bytes:
    """What may follow a raw record's pixels: Caffe's label and `encoded: false`, or anything else."""
    kind = rng.random()
    label = int(rng.choice([0, 1, 9, 300, -1, -2**31, 2**31 - 1, 2**40 + 3]))
    if kind < 0.3:
        return field_varint(5, label) + field_varint(7, 0)  # what Caffe writes
    if kind < 0.4:
        return field_varint(5, label)
    if kind < 0.45:
        return b""
    if kind < 0.5:
        return field_varint(7, 0)
    return random_datum_bytes(rng)  # float_data, repeated or unknown fields, damage


def test_raw_layout_answers_only_what_protobuf_reads_the_same(rng):
    layout = RawRecordLayout(3, 2, 4)
    header = field_varint(1, 3) + field_varint(2, 2) + field_varint(3, 4) + tag(4, 2) + varint(24)
    assert layout.header == header
    hits = misses = 0
    for _ in range(4000):
        buf = bytearray(header + rng.bytes(24) + _raw_record_tail(rng))
        if rng.random() < 0.1:  # a damaged header or pixels, or another shape
            buf[int(rng.integers(0, len(header) + 1))] ^= int(rng.integers(1, 256))
        buf = bytes(buf)
        answer = layout.read(memoryview(buf))
        expected = parsed_fields(parse_datum, buf)
        if answer is None:
            misses += 1
            continue
        hits += 1
        data, label = answer
        assert expected == (3, 2, 4, bytes(data), label, b"", False), buf.hex()
        assert np.shares_memory(np.frombuffer(data, np.uint8), np.frombuffer(buf, np.uint8))
    assert hits > 1500 and misses > 1000


@pytest.mark.parametrize("label", [0, 9, -1, -2**31, 2**31 - 1])
def test_raw_layout_reads_every_record_the_converter_writes(rgb_image, label):
    buf = image_to_datum_bytes(rgb_image, label=label)
    view = parse_datum_view(buf)
    layout = RawRecordLayout(view.channels, view.height, view.width)
    data, read_label = layout.read(buf)
    assert bytes(data) == bytes(view.data) and read_label == label
    assert layout.read(serialize_datum(image_to_datum(rgb_image, label=label))) is not None  # protobuf's bytes
    assert RawRecordLayout(view.channels, view.height + 1, view.width).read(buf) is None
    assert layout.read(buf[:-1]) is None


# ---------------------------------------------------------------- hostile files: a DatumError that says why, or pixels

def test_png_without_image_data_is_a_datum_error_that_says_so(hostile_files):
    data = hostile_files["no-idat.png"]
    assert len(data) == 45
    for gray in (False, True, None):
        with pytest.raises(DatumError, match=r"45 bytes.*PNG has no image data \(no IDAT chunk\)"):
            open_image(data, gray=gray)
    with pytest.raises(DatumError, match="no IDAT chunk"):
        datum_to_image_array(encoded_to_datum(data))


@pytest.mark.parametrize("gray", [False, True])
def test_damaged_exif_tag_keeps_the_orientation_in_pixels_and_header(hostile_files, gray):
    """Orientation 6 with a mistyped tag: Pillow cannot write the block back (struct.error), OpenCV turns it."""
    data = hostile_files["damaged-exif.jpg"]
    image = open_image(data, gray=gray)
    assert image.size == (16, 24) and image.mode == ("L" if gray else "RGB")  # stored 24 wide x 16 high
    assert read_encoded_header(data)[1:] == (3, 24, 16, 6)
    assert datum_to_image_array(encoded_to_datum(data)).shape == (3, 24, 16)
    upright = np.asarray(open_image(data)).astype(int)
    assert upright[-1, :, 0].mean() > upright[0, :, 0].mean() + 200  # red ran left to right; now top to bottom


def test_unreadable_exif_means_orientation_one_in_pixels_and_header(hostile_files):
    """An EXIF block whose first IFD lies past its end cannot be read: orientation 1, as OpenCV decodes it."""
    data = unreadable_exif(hostile_files["damaged-exif.jpg"])
    for gray in (False, True, None):
        assert open_image(data, gray=gray).size == (24, 16)  # as stored
    assert read_encoded_header(data)[1:] == (3, 16, 24, 1)
    assert datum_to_image_array(encoded_to_datum(data)).shape == (3, 16, 24)


# ---------------------------------------------------------------- fuzzing the decode paths with mutated real files

FUZZ_PHOTOS = ("rocket.jpg", "grace_hopper.jpg", "moon.png", "chelsea.png", "logo.png")
FUZZ_MUTANTS_PER_FILE = 70


def _with_real_exif(jpeg: bytes, exif_jpeg: bytes, orientation: int = 6) -> bytes:
    """`jpeg` with the APP1 EXIF segment of `exif_jpeg` (a camera's or Photoshop's) spliced in, its orientation set."""
    start = exif_jpeg.index(b"\xff\xe1")
    segment = bytearray(exif_jpeg[start:start + 2 + int.from_bytes(exif_jpeg[start + 2:start + 4], "big")])
    tiff = segment.index(b"Exif\x00\x00") + 6
    order = "little" if segment[tiff:tiff + 2] == b"II" else "big"
    entry = segment.index((0x0112).to_bytes(2, order) + (3).to_bytes(2, order), tiff)  # Orientation, SHORT
    segment[entry + 8:entry + 10] = orientation.to_bytes(2, order)
    return jpeg[:2] + bytes(segment) + jpeg[2:]


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each PNG chunk, or of each JPEG marker segment before the scan: the units a mutant drops."""
    spans = []
    if data.startswith(b"\x89PNG"):
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
            spans.append((pos, end))
            pos = end
    else:
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:  # up to start of scan
            end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            spans.append((pos, end))
            pos = end
    return spans


#: Tags found in real EXIF blocks (Make, Orientation, XResolution, T4Options, Software, DateTime, Exif and GPS
#: IFD pointers): a tag number rewritten to another real one makes the entry's type contradict its number.
_REAL_TAGS = (0x010F, 0x0112, 0x011A, 0x0124, 0x0128, 0x0131, 0x0132, 0x8769, 0x8825)


def _corrupt_exif_tag(data: bytes, rng: np.random.Generator) -> bytes:
    """One field of one EXIF IFD entry damaged: its tag, its type, its count or its value/offset; or the entry count."""
    tiff = data.find(b"Exif\x00\x00") + 6
    if tiff < 6:
        return data
    order = "little" if data[tiff:tiff + 2] == b"II" else "big"
    ifd = tiff + int.from_bytes(data[tiff + 4:tiff + 8], order)
    count = int.from_bytes(data[ifd:ifd + 2], order)
    mutant = bytearray(data)
    if count == 0 or rng.random() < 0.1:  # the entry count itself: a truncated or overlong IFD
        mutant[ifd:ifd + 2] = int(rng.integers(0, 1 << 16)).to_bytes(2, order)
        return bytes(mutant)
    entry = ifd + 2 + 12 * int(rng.integers(0, count))
    field = int(rng.integers(0, 4))
    if field == 0:  # another real tag's number
        start, width, value = 0, 2, int(rng.choice(_REAL_TAGS))
    elif field == 1:  # another TIFF type (1-12 are defined), or none
        start, width, value = 2, 2, int(rng.integers(0, 14))
    else:  # a count or a value/offset: small, random, or past any end
        start, width = (4, 4) if field == 2 else (8, 4)
        value = int(rng.choice([0, 1, 2, 0xFFFF, 0xFFFFFFFF, int(rng.integers(0, 1 << 32))]))
    mutant[entry + start:entry + start + width] = value.to_bytes(width, order)
    return bytes(mutant)


def _mutant(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of a real file: byte flips (mostly in the headers), a cut, a dropped segment, an EXIF tag."""
    has_exif = b"Exif\x00\x00" in data[:2048]
    kind = 3 if has_exif and rng.random() < 0.5 else int(rng.integers(0, 3))
    if kind == 0:
        mutant = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(0, min(len(data), 2048) if rng.random() < 0.8 else len(data)))
            mutant[pos] = int(rng.integers(0, 256))
        return bytes(mutant)
    if kind == 1:
        return data[:int(rng.integers(0, len(data)))]
    if kind == 2:  # one chunk or segment, or every one of its kind (each IDAT, each DHT)
        spans = _segments(data)
        start, end = spans[int(rng.integers(0, len(spans)))]
        kind_of = (lambda a: data[a + 4:a + 8]) if data.startswith(b"\x89PNG") else (lambda a: data[a:a + 2])
        drop = [(a, b) for a, b in spans if kind_of(a) == kind_of(start)] if rng.random() < 0.3 else [(start, end)]
        for a, b in reversed(drop):
            data = data[:a] + data[b:]
        return data
    return _corrupt_exif_tag(data, rng)


def _image_shape(image: Image.Image) -> tuple[int, int, int]:
    assert image.mode in ("RGB", "L"), image.mode
    return len(image.getbands()), image.height, image.width


#: Each decode path, giving the (C, H, W) it decodes a file's bytes to.
DECODE_PATHS = {
    "color": lambda data: _image_shape(open_image(data)),
    "gray": lambda data: _image_shape(open_image(data, gray=True)),
    "native": lambda data: _image_shape(open_image(data, gray=None)),
    "header": lambda data: tuple(read_encoded_header(data)[1:4]),
    "datum": lambda data: datum_to_image_array(parse_datum(serialize_datum(encoded_to_datum(data)))).shape,
    # what convert --encoded stores: the bytes after a cheap integrity check, or a re-encoded decode
    "stored": lambda data: encoded_payload(data, ConvertOptions(encoded=True, check_size=True))[1],
}


def _decode_paths(data: bytes) -> dict[str, tuple[int, ...]]:
    """The (C, H, W) of each path that decodes `data`; a path that cannot raises DatumError, anything else escapes."""
    shapes = {}
    for name, decode in DECODE_PATHS.items():
        try:
            shapes[name] = tuple(decode(data))
        except DatumError as exc:
            assert "object at 0x" not in str(exc), (name, str(exc))  # what is wrong, not Pillow's file object
    return shapes


def test_mutated_real_files_decode_consistently_or_raise_datum_error(shared_images):
    """Every decode path on a few hundred seeded mutants: pixels whose dims all paths agree on, or a DatumError.

    Nothing else may escape. Before decode errors were caught at the boundary, about 7% of the
    damaged EXIF tags ended in struct.error, TypeError or AttributeError (from writing the block
    back out), and a PNG without IDAT chunks in IndexError (in `encoded_payload`'s check).
    """
    rng = np.random.default_rng(22)
    photos = {name: (shared_images / name).read_bytes() for name in FUZZ_PHOTOS}
    camera_exif = (shared_images / "hubble_deep_field.jpg").read_bytes()  # Photoshop's EXIF block, orientation 1
    photos["rocket-exif6.jpg"] = _with_real_exif(photos["rocket.jpg"], camera_exif, orientation=6)
    photos["grace_hopper-exif8.jpg"] = _with_real_exif(photos["grace_hopper.jpg"], camera_exif, orientation=8)
    refused = decoded = 0
    for name, data in photos.items():
        for i in range(FUZZ_MUTANTS_PER_FILE):
            mutant = _mutant(data, rng)
            try:
                shapes = _decode_paths(mutant)
            except Exception as exc:  # the finding: report which mutant, reproducibly
                raise AssertionError(f"{name} mutant {i}: {type(exc).__name__}: {exc}") from exc
            decoded += "color" in shapes
            refused += "color" not in shapes
            sizes = {shape[1:] for shape in shapes.values()}
            assert len(sizes) <= 1, (name, i, shapes)  # every path that decodes agrees on H x W
            assert shapes.get("color", (3,))[0] == 3 and shapes.get("gray", (1,))[0] == 1, (name, i, shapes)
            assert shapes.get("stored", (3,))[0] == 3, (name, i, shapes)
            if "native" in shapes:
                assert shapes["native"] == shapes.get("datum", shapes["native"]), (name, i, shapes)
                assert shapes["native"] == shapes.get("header", shapes["native"]), (name, i, shapes)
    assert decoded > 100 and refused > 100  # the mutations both break files and leave some decodable
