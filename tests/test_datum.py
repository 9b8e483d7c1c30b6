"""The Datum codec: pixel-exact round trips, Caffe's wire bytes, planar BGR, and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import png_bytes
from PIL import Image
from wire import field_bytes, field_float, field_varint

from caffe_lmdb import (
    Datum,
    DatumError,
    array_to_datum,
    check_datum,
    datum_to_array,
    datum_to_encoded,
    datum_to_image,
    encoded_to_datum,
    image_to_datum,
    open_image,
    parse_datum,
    serialize_datum,
)


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
    assert back.dtype == np.float32 and np.array_equal(back, floats)


def test_raw_array_is_a_view_not_a_copy(rgb_image):
    datum = image_to_datum(rgb_image)
    arr = datum_to_array(datum)
    assert not arr.flags.writeable  # np.frombuffer over the Datum's bytes


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
