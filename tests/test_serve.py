"""`caffe-lmdb serve` over HTTP: every route, every security rule, broken records, the read-only promise.

Each test starts the server in a thread on a free port (`make_server(..., port=0)`) and talks to it
with `http.client`, which sends paths exactly as written (no `..` folded away), as an attacker's
client would.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, caffe_key, caffe_raw_datum, png_bytes, png_without_idat, run_cli
from PIL import Image
from toollmdbs import converted, encoded_datum, hand_written, raw_value, same_size_tree

from caffe_lmdb.keys import save_keys
from caffe_lmdb.serve_transform import transforms_from
from caffe_lmdb.serving import MAX_PAGE, make_server

# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def running(paths, host="127.0.0.1", **options):
    """A server on a free port, serving in a thread while the block runs."""
    server = make_server([str(p) for p in paths], host, 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def fetch(server, path, method="GET", headers=None, host=None):
    """(status, headers, body) of one request, the path sent as written."""
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def page(server, path, **kwargs) -> str:
    status, _, body = fetch(server, path, **kwargs)
    assert status == 200, (path, status, body[:500])
    return body.decode()


def wait_for(server, number: int, what: str) -> None:
    """Until the LMDB's background job (`overview` or `check`) has finished."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _, body = fetch(server, f"/db/{number}/status/{what}.json")
        if status == 200 and b'"finished": true' in body:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not finish")


def png_pixels(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def red_blue() -> np.ndarray:
    """An RGB image, left half pure red, right half pure blue (12 high x 16 wide)."""
    pixels = np.zeros((12, 16, 3), np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    return pixels


@pytest.fixture
def train_lmdb(tmp_path, rng) -> Path:
    """A converter-made LMDB (keys file, class file): classes ant and bee, 3 records each, 5 x 7 RGB."""
    return converted(same_size_tree(tmp_path / "src", rng), tmp_path / "train.lmdb")


@pytest.fixture
def mixed_lmdb(tmp_path) -> Path:
    """Hand-written Caffe records: good raw and encoded ones, a non-Datum, a PNG without pixels, a short raw one."""
    short = caffe_raw_datum(red_blue(), 1)
    short.data = short.data[:-5]
    records = {
        caffe_key(0, "red_blue_raw.png"): raw_value(red_blue(), 0),
        caffe_key(1, "red_blue.png"): encoded_datum(png_bytes(Image.fromarray(red_blue())), 1),
        caffe_key(2, "garbage.bin"): b"\xff\xfe not a datum",
        caffe_key(3, "no-idat.png"): encoded_datum(png_without_idat(), 0),
        caffe_key(4, "short.raw"): short.SerializeToString(),
        caffe_key(5, "bomb.png"): encoded_datum(png_without_idat(30000, 30000), 1),
    }
    return hand_written(tmp_path / "mixed.lmdb", records)


# --------------------------------------------------------------------------- every route


def test_every_page_answers_with_its_content(train_lmdb):
    with running([train_lmdb], transforms=transforms_from(crop_size=4, mirror=True)) as server:
        assert "train.lmdb" in page(server, "/")
        overview = page(server, "/db/0/")
        assert "train_keys.npy" in overview and "2 classes" in overview
        wait_for(server, 0, "overview")
        overview = page(server, "/db/0/")
        assert "6 raw, 0 encoded, 0 float" in overview and ">ant<" in overview and ">bee<" in overview
        assert re.search(r"<td>3x5x7</td><td>6</td>", overview)
        gallery = page(server, "/db/0/gallery")
        assert gallery.count('<figure class="tile') == 6 and "00000003_bee/0.png" in gallery
        record = page(server, "/db/0/record/3")
        assert "00000003_bee/0.png" in record and "3x5x7" in record and ">bee<" in record
        assert 'rel="prev" href="/db/0/record/2"' in record and 'rel="next" href="/db/0/record/4"' in record
        for path, content_type in (("/db/0/thumb/3.png", "image/png"), ("/db/0/image/3.png", "image/png"),
                                   ("/db/0/download/3", "application/octet-stream"),
                                   ("/db/0/value/3", "application/octet-stream"),
                                   ("/db/0/transform/3/test.png", "image/png"),
                                   ("/db/0/transform/3/train-1.png", "image/png"),
                                   ("/static/app.js", "text/javascript; charset=utf-8"),
                                   ("/static/style.css", "text/css; charset=utf-8"),
                                   ("/static/icon.svg", "image/svg+xml"),
                                   ("/db/0/status/overview.json", "application/json")):
            status, headers, body = fetch(server, path)
            assert (status, headers["Content-Type"]) == (200, content_type), path
            assert int(headers["Content-Length"]) == len(body) > 0
        assert 'filename="0.png"' in fetch(server, "/db/0/download/3")[1]["Content-Disposition"]
        transform = page(server, "/db/0/transform/3")
        assert "TEST" in transform and "TRAIN, epoch 3" in transform and "blob 3x4x4 float32" in transform
        assert "Run the check" in page(server, "/db/0/problems")
        status, headers, _ = fetch(server, "/db/0/problems?run=1")
        assert (status, headers["Location"]) == (303, "/db/0/problems")
        wait_for(server, 0, "check")
        assert "No problems found" in page(server, "/db/0/problems")


def test_head_is_get_without_the_body(train_lmdb):
    with running([train_lmdb]) as server:
        _, get_headers, body = fetch(server, "/db/0/thumb/0.png")
        status, headers, head_body = fetch(server, "/db/0/thumb/0.png", method="HEAD")
        assert (status, head_body) == (200, b"")
        assert headers["Content-Length"] == get_headers["Content-Length"] == str(len(body))


def test_a_thumbnail_comes_back_with_an_etag_and_a_304(train_lmdb):
    with running([train_lmdb]) as server:
        _, headers, _ = fetch(server, "/db/0/thumb/1.png")
        status, _, body = fetch(server, "/db/0/thumb/1.png", headers={"If-None-Match": headers["ETag"]})
        assert (status, body) == (304, b"")


def test_the_record_and_the_gallery_of_another_layout(tmp_path, rng):
    records = {b"num-samples": b"2"}
    for i, label in ((1, "hello"), (2, "世界")):
        records[b"image-%09d" % i] = png_bytes(Image.fromarray(red_blue()))
        records[b"label-%09d" % i] = label.encode()
    path = hand_written(tmp_path / "ocr_lmdb", records)
    with running([path]) as server:
        overview = page(server, "/db/0/")
        assert "crnn" in overview and "str (e.g. " in overview
        gallery = page(server, "/db/0/gallery")
        assert gallery.count('<figure class="tile') == 2 and "世界" in gallery and "key or key prefix" not in gallery
        assert "image-000000002" in page(server, "/db/0/record/1")
        assert png_pixels(fetch(server, "/db/0/thumb/0.png")[2])[80, 20].tolist() == [255, 0, 0]
        assert fetch(server, "/db/0/download/0")[2] == records[b"image-000000001"]
        fetch(server, "/db/0/problems?run=1")
        wait_for(server, 0, "check")
        assert "No problems found" in page(server, "/db/0/problems")


def test_a_folder_serves_every_lmdb_under_it(tmp_path, rng):
    for name in ("a", "b/c"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        hand_written(tmp_path / "data" / name, {caffe_key(0, "x.png"): raw_value(red_blue(), 0)})
    with running([tmp_path / "data"]) as server:
        index = page(server, "/")
        assert "2 LMDBs" in index and 'href="/db/1/"' in index
        assert page(server, "/db/1/gallery").count('<figure class="tile') == 1


# --------------------------------------------------------------------------- security


SECURITY = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


@pytest.mark.parametrize("path", ["/", "/db/0/gallery", "/db/0/thumb/0.png", "/static/app.js", "/nothing"])
def test_every_answer_carries_the_security_headers(train_lmdb, path):
    with running([train_lmdb]) as server:
        for method, host in (("GET", None), ("POST", None), ("GET", "evil.example:1")):
            _, headers, _ = fetch(server, path, method=method, host=host)
            assert all(headers[name] == value for name, value in SECURITY.items()), (path, method, host)
            policy = headers["Content-Security-Policy"]
            assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert "unsafe-inline" not in policy and "script-src 'self'" in policy


def test_pages_hold_no_inline_script_or_style(train_lmdb):
    with running([train_lmdb], transforms=transforms_from(crop_size=4)) as server:
        page(server, "/db/0/")
        wait_for(server, 0, "overview")
        for path in ("/", "/db/0/", "/db/0/gallery", "/db/0/record/0", "/db/0/problems", "/db/0/transform/0"):
            text = page(server, path)
            assert "<script>" not in text and "<style" not in text and " style=" not in text
            assert not re.search(r"<[^>]*\son[a-z]+\s*=", text), path  # no onclick=... handlers
            assert re.findall(r"<script[^>]*>", text) == ['<script src="/static/app.js" defer>']


def test_a_foreign_host_header_is_refused(train_lmdb):
    with running([train_lmdb]) as server:
        port = server.server_address[1]
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}",
                     f"user@127.0.0.1:{port}", ""):
            status, _, body = fetch(server, "/", host=host)
            assert status == 421, host
            assert b"train.lmdb" not in body
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
            assert fetch(server, "/", host=host)[0] == 200, host
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # HTTP/1.0, no Host at all
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 421")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_only_get_and_head_are_answered(train_lmdb, method):
    with running([train_lmdb]) as server:
        status, headers, _ = fetch(server, "/db/0/gallery", method=method)
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        assert fetch(server, "/")[0] == 200  # and it keeps serving


TRAVERSALS = ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../../../etc/passwd",
              "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/..%2f..%2fetc%2fpasswd", "//etc/passwd",
              "/etc/passwd", "/db/0/../../../../etc/passwd", "/db/0/record/..%2f..%2f..%2fetc%2fpasswd",
              "/db/0/thumb/0.png/../../../etc/passwd", "/static/app.js%00.png", "/db/0/%2e%2e/%2e%2e/",
              "/..\\..\\etc\\passwd", "/static/%252e%252e/passwd", "http://127.0.0.1/etc/passwd", "/db/-1/",
              "/db/00/", "/db/0/record/-1", "/db/0/record/1e3", "/db/0/record/01", "/static/", "/static/APP.JS"]


def test_traversal_attempts_get_404_and_open_no_file(train_lmdb):
    opened: list[str] = []
    watching = threading.Event()

    def audit(event, args):
        if watching.is_set() and event == "open" and "process_request" in threading.current_thread().name:
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks stay for the process's life; this one only records while `watching`
    with running([train_lmdb]) as server:
        page(server, "/db/0/gallery")
        watching.set()
        try:
            for path in [*TRAVERSALS, f"{train_lmdb}/data.mdb", f"/{train_lmdb.parent}/train_keys.npy"]:
                status, _, body = fetch(server, path)
                assert status == 404, path
                assert b"root:" not in body
        finally:
            watching.clear()
    assert opened == []


def test_off_loopback_every_request_needs_the_token(train_lmdb):
    with running([train_lmdb], host="0.0.0.0") as server:
        token = server.app.token
        port = server.server_address[1]
        assert token and len(token) >= 24 and f"?token={token}" in server.url
        assert fetch(server, "/")[0] == 403
        assert fetch(server, "/db/0/thumb/0.png")[0] == 403
        assert fetch(server, "/?token=wrong")[0] == 403
        assert fetch(server, "/", headers={"Cookie": f"caffe_lmdb_token_{port}=wrong"})[0] == 403
        status, headers, _ = fetch(server, f"/db/0/gallery?size=24&token={token}")
        assert (status, headers["Location"]) == (303, "/db/0/gallery?size=24")
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite" in headers["Set-Cookie"]
        assert fetch(server, "/db/0/gallery?size=24", headers={"Cookie": cookie})[0] == 200
        assert fetch(server, f"/?token={token}", host=f"evil.example:{port}")[0] == 421  # the token is no way round


def test_loopback_needs_no_token(train_lmdb):
    with running([train_lmdb]) as server:
        assert server.app.token is None and server.url == f"http://127.0.0.1:{server.server_address[1]}/"


def test_page_sizes_are_bounded(tmp_path):
    records = {caffe_key(i, f"{i}.png"): raw_value(red_blue(), i % 3) for i in range(MAX_PAGE + 50)}
    path = hand_written(tmp_path / "many.lmdb", records)
    with running([path]) as server:
        assert page(server, "/db/0/gallery?size=1000000").count('<figure class="tile') == MAX_PAGE
        assert page(server, "/db/0/gallery?size=0").count('<figure class="tile') == 1
        assert page(server, f"/db/0/gallery?start={MAX_PAGE}&size=100").count('<figure class="tile') == 50
        assert page(server, "/db/0/gallery?start=99999999").count('<figure class="tile') == 1  # the last one
        assert fetch(server, "/db/0/gallery?size=abc")[0] == 400
        assert fetch(server, "/db/0/gallery?size=" + "9" * 40)[0] == 400


@pytest.mark.parametrize("path", ["/db/0/record/6", "/db/0/thumb/6.png", "/db/0/image/99.png", "/db/0/download/6",
                                  "/db/0/value/6", "/db/0/transform/6", "/db/1/", "/db/0/gallery?at=6",
                                  "/db/0/image/0.png?part=1", "/db/0/transform/0/train-9.png"])
def test_an_index_out_of_range_is_404(train_lmdb, path):
    with running([train_lmdb], transforms=transforms_from(crop_size=4)) as server:
        assert fetch(server, path)[0] == 404


# --------------------------------------------------------------------------- what the pictures show


def test_thumbnails_show_red_as_red_and_blue_as_blue(mixed_lmdb):
    """Raw records are planar BGR: the thumbnail is the photo, not its channels swapped."""
    with running([mixed_lmdb]) as server:
        for index in (0, 1):  # raw, and encoded PNG
            status, headers, body = fetch(server, f"/db/0/thumb/{index}.png")
            assert status == 200 and "X-Caffe-Lmdb-Problem" not in headers
            pixels = png_pixels(body)
            middle = pixels.shape[0] // 2
            assert pixels[middle, 10].tolist() == [255, 0, 0], index
            assert pixels[middle, pixels.shape[1] - 10].tolist() == [0, 0, 255], index
            full = png_pixels(fetch(server, f"/db/0/image/{index}.png")[2])
            assert np.array_equal(full, red_blue())


def test_a_damaged_record_is_a_broken_tile_with_its_reason(mixed_lmdb):
    with running([mixed_lmdb]) as server:
        gallery = page(server, "/db/0/gallery")  # what parsing finds; the PNG without pixels needs a decode
        assert gallery.count('<figure class="tile broken">') == 3
        assert "not a Datum" in gallery or "not a serialized" in gallery
        assert "raw datum data has" in gallery and "decompression bomb" in gallery
        for index in (2, 3, 4, 5):
            status, headers, body = fetch(server, f"/db/0/thumb/{index}.png")
            assert status == 200 and headers["X-Caffe-Lmdb-Problem"], index
            assert png_pixels(body).shape == (160, 160, 3)
            assert fetch(server, f"/db/0/record/{index}")[0] == 200
            assert fetch(server, f"/db/0/image/{index}.png")[0] == 200
        gallery = page(server, "/db/0/gallery")  # once its thumbnail was made, its caption says why too
        assert gallery.count('<figure class="tile broken">') == 4 and "no IDAT" in gallery
        assert fetch(server, "/db/0/download/3")[2] == png_without_idat()  # the stored bytes, as they are
        assert fetch(server, "/db/0/download/2")[0] == 422
        assert fetch(server, "/db/0/thumb/0.png")[0] == 200  # still serving


def test_a_decompression_bomb_is_a_placeholder_not_a_crash(mixed_lmdb, tmp_path):
    with running([mixed_lmdb]) as server:
        status, headers, _ = fetch(server, "/db/0/thumb/5.png")
        assert status == 200 and "decompression bomb" in headers["X-Caffe-Lmdb-Problem"]
        assert "30000x30000" in page(server, "/db/0/record/5")
    big = hand_written(tmp_path / "big.lmdb", {caffe_key(0, "big.png"): encoded_datum(
        png_bytes(Image.new("RGB", (400, 300), (0, 128, 0))), 0)})
    with running([big], max_pixels=100_000) as server:
        status, headers, _ = fetch(server, "/db/0/thumb/0.png")
        assert status == 200 and "400x300 image (120000 pixels) is over the 100000" in headers["X-Caffe-Lmdb-Problem"]
        status, headers, _ = fetch(server, "/db/0/image/0.png")
        assert status == 200 and "over the 100000" in headers["X-Caffe-Lmdb-Problem"]


def test_an_lmdb_whose_first_record_is_damaged_is_still_shown(tmp_path):
    path = hand_written(tmp_path / "first.lmdb", {caffe_key(0, "bad"): b"\x00\x01junk",
                                                  caffe_key(1, "ok.png"): raw_value(red_blue(), 0)})
    with running([path]) as server:
        assert "shown as Caffe Datum records" in page(server, "/db/0/")
        gallery = page(server, "/db/0/gallery")
        assert gallery.count('<figure class="tile broken">') == 1 and gallery.count('<figure class="tile') == 2


def test_the_transform_page_shows_the_test_crop_and_the_train_draws(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    path = hand_written(tmp_path / "t.lmdb", {caffe_key(0, "x.png"): raw_value(pixels, 0)})
    prototxt = tmp_path / "train_val.prototxt"
    prototxt.write_text("""
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { crop_size: 5 mirror: true mean_value: 100 }
        data_param { source: "nowhere_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { crop_size: 5 mean_value: 100 }
        data_param { source: "nowhere_lmdb" batch_size: 4 backend: LMDB } }
""")
    with running([path], transforms=transforms_from(prototxt)) as server:
        text = page(server, "/db/0/transform/0")
        assert "crop at row 2, column 3" in text  # ((9 - 5) // 2, (11 - 5) // 2): Caffe's floored centre
        assert "TRAIN, epoch 0" in text and "crop_size 5" in text
        test_crop = png_pixels(fetch(server, "/db/0/transform/0/test.png")[2])
        assert np.array_equal(test_crop, pixels[2:7, 3:8])
    with running([path]) as server:
        assert "No transform was given" in page(server, "/db/0/transform/0")
        assert fetch(server, "/db/0/transform/0/test.png")[0] == 404


# --------------------------------------------------------------------------- gallery: filter, jump, search


def test_filter_by_class_jump_and_search(train_lmdb):
    with running([train_lmdb]) as server:
        waiting = page(server, "/db/0/gallery?label=1")
        wait_for(server, 0, "overview")
        assert "<progress" in waiting or '<figure class="tile' in waiting
        bees = page(server, "/db/0/gallery?label=1")
        assert re.findall(r"#(\d+)</span>", bees) == ["3", "4", "5"] and "3 records of class 1 (bee)" in bees
        assert re.findall(r"#(\d+)</span>", page(server, "/db/0/gallery?label=1&size=2&start=2")) == ["5"]
        assert re.findall(r"#(\d+)</span>", page(server, "/db/0/gallery?at=4&size=24"))[0] == "4"
        assert re.findall(r"#(\d+)</span>", page(server, "/db/0/gallery?at=1&size=24&label=1"))[0] == "3"
        assert "No records" in page(server, "/db/0/gallery?label=7")
        status, headers, _ = fetch(server, "/db/0/gallery?key=00000004_bee/1.png")
        assert (status, headers["Location"]) == (303, "/db/0/record/4")
        status, headers, _ = fetch(server, "/db/0/gallery?key=00000003&size=24")
        assert (status, headers["Location"]) == (303, "/db/0/gallery?start=3&size=24")
        status, _, body = fetch(server, "/db/0/gallery?key=zzz")
        assert status == 404 and b"No key starts with" in body


def test_a_keys_file_in_another_order_than_the_lmdbs(tmp_path):
    """Indices follow the keys file; labels, search and the check's links find their record by key."""
    keys = [caffe_key(i, f"{i}.png") for i in range(5)]
    path = hand_written(tmp_path / "r.lmdb", {key: raw_value(red_blue(), i) for i, key in enumerate(keys)})
    save_keys(tmp_path / "r_keys.npy", keys[::-1])
    with running([path]) as server:
        assert re.findall(r"#(\d+)</span> (\d+)", page(server, "/db/0/gallery")) == [
            ("0", "4"), ("1", "3"), ("2", "2"), ("3", "1"), ("4", "0")]
        wait_for(server, 0, "overview")
        assert re.findall(r"#(\d+)</span> (\d+)", page(server, "/db/0/gallery?label=1")) == [("3", "1")]
        status, headers, _ = fetch(server, "/db/0/gallery?key=00000001_1.png")
        assert (status, headers["Location"]) == (303, "/db/0/record/3")


def test_the_problems_page_links_each_finding_to_its_record(mixed_lmdb):
    with running([mixed_lmdb]) as server:
        fetch(server, "/db/0/problems?run=1")
        wait_for(server, 0, "check")
        text = page(server, "/db/0/problems")
        for index in (2, 3, 4):
            assert f'<a href="/db/0/record/{index}">{index}</a>' in text
        assert "00000003_no-idat.png" in text and "problems" in text


# --------------------------------------------------------------------------- read-only


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in `folder` (not below it) -> its bytes and modification time; folders by name."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else (b"", 0)
            for p in sorted(folder.iterdir())}


def test_a_session_writes_nothing_and_makes_no_lock_file(train_lmdb, tmp_path):
    single = tmp_path / "single.mdb"
    env = lmdb.open(str(single), subdir=False, map_size=1 << 22, lock=False)
    with env.begin(write=True) as txn:
        txn.put(caffe_key(0, "x.png"), raw_value(red_blue(), 0))
    env.close()
    (train_lmdb / "lock.mdb").unlink()  # the converter's writer left one: none may come back
    before = _snapshot(train_lmdb), _snapshot(tmp_path)
    with running([train_lmdb, single], transforms=transforms_from(crop_size=4)) as server:
        for number in (0, 1):
            for path in ("/", f"/db/{number}/", f"/db/{number}/gallery", f"/db/{number}/record/0",
                         f"/db/{number}/thumb/0.png", f"/db/{number}/image/0.png", f"/db/{number}/download/0",
                         f"/db/{number}/value/0", f"/db/{number}/transform/0", f"/db/{number}/transform/0/test.png",
                         f"/db/{number}/problems?run=1"):
                assert fetch(server, path)[0] in (200, 303), path
            wait_for(server, number, "overview")
            wait_for(server, number, "check")
    after = _snapshot(train_lmdb), _snapshot(tmp_path)
    assert after == before
    assert not (train_lmdb / "lock.mdb").exists() and not Path(f"{single}-lock").exists()


# --------------------------------------------------------------------------- the command


def test_the_command_prints_its_url_and_stops_on_ctrl_c(train_lmdb):
    command = [sys.executable, "-m", "caffe_lmdb.cli", "serve", str(train_lmdb), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + process.stderr.read()
        connection = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        connection.request("GET", "/db/0/gallery")
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in out + err and "stopped" in err


def test_start_errors_are_one_line(tmp_path, train_lmdb):
    assert_one_line_error(run_cli("serve", tmp_path / "missing.lmdb", "--port", "0"), 1, "missing.lmdb")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("serve", tmp_path / "empty", "--port", "0"), 1, "no LMDB under this folder")
    cut = tmp_path / "cut.lmdb"
    cut.mkdir()
    (cut / "data.mdb").write_bytes((train_lmdb / "data.mdb").read_bytes()[:8192])
    assert_one_line_error(run_cli("serve", cut, "--port", "0"), 1, "cut.lmdb", "truncated")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("serve", train_lmdb, "--port", str(port)), 1, f"127.0.0.1:{port}", "--port")
    assert_one_line_error(run_cli("serve", train_lmdb, "--port", "0", "--prototxt", tmp_path / "no.prototxt"), 2,
                          "no.prototxt")
