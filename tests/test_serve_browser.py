"""`caffe-lmdb serve` in a real browser: headless Chromium (Debian's `chromium`, `chromium-driver`) driven by selenium.

One walk through the pages, as a person would click it: the overview (its progress polled by the
page's script until the counts show), the gallery paged with its link, every thumbnail decoded
(`naturalWidth > 0`, broken records included: they are placeholder images), a thumbnail followed
to its record, previous/next by arrow key and by link, a class chosen in the menu (the script
submits it), a key searched, the problems check run from its button, the transform page. Any
message the browser logs as an error (a script error, a refused Content-Security-Policy, a failed
load) fails the test. Screenshots of each page are saved (into `$SERVE_SCREENSHOTS` when set).

Without a browser it skips, saying why (`make test` installs one where it can: as root on
Debian, as in CI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import caffe_key
from toollmdbs import encoded_datum, hand_written, raw_value

from caffe_lmdb.serve_transform import transforms_from
from caffe_lmdb.serving import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (a dev extra: pip install -e '.[dev]')"
    if CHROMIUM is None or DRIVER is None:
        return "no chromium and chromium-driver here (Debian: apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser():
    missing = _missing()
    if missing is not None:
        pytest.skip(f"no real browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def running(paths, **options):
    server = make_server([str(p) for p in paths], "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def classes_lmdb(tmp_path) -> Path:
    """30 raw records of 3 classes (each a colour, 24 x 32), one damaged record, and the class file."""
    records = {}
    for i in range(30):
        pixels = np.zeros((24, 32, 3), np.uint8)
        pixels[..., i % 3] = 80 + 5 * i
        records[caffe_key(i, f"c{i % 3}/{i}.png")] = raw_value(pixels, i % 3)
    records[caffe_key(30, "c0/broken.png")] = encoded_datum(b"\x89PNG\r\n\x1a\n not really", 0)
    path = hand_written(tmp_path / "colours.lmdb", records)
    (tmp_path / "colours_classes.txt").write_text("red\ngreen\nblue\n")
    return path


def _errors(driver, seen: list[str]) -> list[str]:
    """The browser's error messages since the last call, added to `seen`."""
    seen += [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return seen


def _all_images_decoded(driver) -> bool:
    return driver.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        " && document.images.length > 0")


def test_a_person_clicking_through_the_pages(classes_lmdb, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = Path(os.environ.get("SERVE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, 20)
    errors: list[str] = []

    def shoot(name: str) -> None:
        wait.until(lambda d: _all_images_decoded(d) or not d.find_elements(By.TAG_NAME, "img"))
        browser.save_screenshot(str(shots / f"serve-{name}.png"))
        assert _errors(browser, errors) == []

    with running([classes_lmdb], transforms=transforms_from(crop_size=16, mirror=True)) as base:
        browser.get(base + "/db/0/")  # the counts come by the page's own polling and reload
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.histogram meter"))
        assert "green" in browser.page_source and "30 raw, 1 encoded" in browser.page_source
        shoot("overview")

        browser.get(base + "/db/0/gallery?size=24")
        wait.until(_all_images_decoded)
        assert len(browser.find_elements(By.CSS_SELECTOR, "figure.tile")) == 24
        shoot("gallery")
        browser.find_element(By.CSS_SELECTOR, 'a[rel="next"]').click()
        wait.until(lambda d: "start=24" in d.current_url and _all_images_decoded(d))
        tiles = browser.find_elements(By.CSS_SELECTOR, "figure.tile")
        assert len(tiles) == 7 and len(browser.find_elements(By.CSS_SELECTOR, "figure.tile.broken")) == 1

        tiles[0].find_element(By.TAG_NAME, "a").click()  # record 24
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.endswith("record 24"))
        wait.until(_all_images_decoded)
        shoot("record")
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.endswith("record 25"))
        browser.find_element(By.CSS_SELECTOR, 'a[rel="prev"]').click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.endswith("record 24"))

        browser.get(base + "/db/0/gallery?size=24")
        Select(browser.find_element(By.NAME, "label")).select_by_value("2")  # submitted by the script
        wait.until(lambda d: "label=2" in d.current_url and _all_images_decoded(d))
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "figure.tile figcaption")]
        assert len(captions) == 10 and all(" 2 blue" in caption for caption in captions)

        search = browser.find_element(By.NAME, "key")
        search.send_keys("00000007_c1/7.png")
        search.submit()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.endswith("record 7"))

        browser.get(base + "/db/0/problems")
        browser.find_element(By.CSS_SELECTOR, "a.button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.problems"))
        assert "00000030_c0/broken.png" in browser.page_source
        shoot("problems")
        browser.find_element(By.CSS_SELECTOR, "table.problems a").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.endswith("record 30"))
        wait.until(_all_images_decoded)  # the broken record's placeholder is an image too

        browser.get(base + "/db/0/transform/5")
        wait.until(_all_images_decoded)
        assert len(browser.find_elements(By.TAG_NAME, "img")) == 6  # the record, TEST and 4 TRAIN draws
        shoot("transform")
    assert _errors(browser, errors) == []
