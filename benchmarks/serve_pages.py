"""`caffe-lmdb serve` (issue 27): a gallery page of 100 thumbnails on a big LMDB against the same page on a small one.

Two Datum LMDBs of small raw records (16 x 16 RGB, planar BGR, Caffe keys, keys file beside, as the
converter leaves them): `--big` records (200,000) and `--small` (2,000). One server (`make_server`,
in a thread of this process) serves both; for each, `--pages` gallery pages of 100 thumbnails,
spread across the LMDB, are fetched as a browser fetches them: the page's HTML (its time to first
byte, and whole), then its 100 thumbnails over 6 connections, cold (each made on the server) and
again warm (from the thumbnail cache). The figures are medians over the pages; a page should cost
the same whatever the LMDB's size (big / small near 1).

    python benchmarks/serve_pages.py [--big 200000] [--small 2000] [--pages 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from caffe_lmdb.datum import array_to_datum
from caffe_lmdb.files import default_keys_path
from caffe_lmdb.keys import save_keys
from caffe_lmdb.serving import make_server

PAGE = 100
CONNECTIONS = 6  # what a browser opens to one host


def make_lmdb(path: Path, records: int) -> Path:
    """`records` raw 16 x 16 RGB Datums under Caffe keys (64 distinct images, 10 labels), and the keys file."""
    rng = np.random.default_rng(0)
    values = [array_to_datum(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8), label).SerializeToString()
              for label in range(10) for _ in range(64)]
    keys = [b"%08d_class%d/%d.png" % (i, i % 10, i) for i in range(records)]
    env = lmdb.open(str(path), map_size=1 << 34)
    with env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            txn.put(key, values[(i % 10) * 64 + i % 64])
    env.close()
    save_keys(default_keys_path(path), keys)
    return path


def _get(port: int, path: str, connection: http.client.HTTPConnection | None = None) -> tuple[float, float]:
    """(seconds to the first byte, seconds to the last) of one GET."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    first = time.perf_counter() - started
    response.read()
    assert response.status == 200, (path, response.status)
    if own:
        connection.close()
    return first, time.perf_counter() - started


def _thumbnails(port: int, number: int, start: int) -> float:
    """Seconds to fetch thumbnails start .. start + PAGE - 1 over `CONNECTIONS` kept-alive connections."""
    local = threading.local()

    def fetch(index: int) -> None:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        _get(port, f"/db/{number}/thumb/{index}.png", local.connection)

    started = time.perf_counter()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        list(pool.map(fetch, range(start, start + PAGE)))
    return time.perf_counter() - started


def bench_serve_pages(workdir: Path, big: int, small: int, pages: int) -> dict[str, Any]:
    sizes = {"big": big, "small": small}
    paths = {name: make_lmdb(workdir / f"{name}.lmdb", count) for name, count in sizes.items()}
    started = time.perf_counter()
    server = make_server([str(paths["big"]), str(paths["small"])], "127.0.0.1", 0)
    start_seconds = time.perf_counter() - started
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    results: dict[str, Any] = {"start s (both LMDBs)": start_seconds}
    try:
        for number, (name, count) in enumerate(sizes.items()):
            starts = [round(k * (count - PAGE) / max(pages - 1, 1)) // PAGE * PAGE for k in range(pages)]
            html_first, html_whole, cold, warm = [], [], [], []
            for start in starts:
                first, whole = _get(port, f"/db/{number}/gallery?start={start}&size={PAGE}")
                html_first.append(first)
                html_whole.append(whole)
                server.thumbnails.clear()
                cold.append(_thumbnails(port, number, start))
                warm.append(_thumbnails(port, number, start))
            results[name] = {"records": count, "page starts": starts,
                             "html first byte s": statistics.median(html_first),
                             "html whole s": statistics.median(html_whole),
                             "100 thumbnails cold s": statistics.median(cold),
                             "100 thumbnails warm s": statistics.median(warm)}
    finally:
        server.shutdown()
        server.server_close()
    return results


def format_report(results: dict[str, Any]) -> str:
    big, small = results["big"], results["small"]
    lines = [f"serve: a gallery page of {PAGE} thumbnails, {big['records']} records against {small['records']} "
             f"(medians; server start with both LMDBs {results['start s (both LMDBs)'] * 1000:.0f} ms)"]
    for what in ("html first byte s", "html whole s", "100 thumbnails cold s", "100 thumbnails warm s"):
        lines.append(f"  {what[:-2]:<24} {big[what] * 1000:8.1f} ms  {small[what] * 1000:8.1f} ms  "
                     f"big / small {big[what] / small[what]:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--pages", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        print(format_report(bench_serve_pages(Path(work), args.big, args.small, args.pages)))


if __name__ == "__main__":
    main()
