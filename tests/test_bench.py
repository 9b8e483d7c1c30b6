"""Smoke test of the benchmark script on tiny data: it runs and reports every figure (no timings asserted)."""

from __future__ import annotations

import json

from benchmarks.bench import TARGETS, main
from benchmarks.common import make_images


def test_make_images_is_deterministic(tmp_path):
    first = make_images(tmp_path / "a", 6, classes=2, seed=1)
    second = make_images(tmp_path / "b", 6, classes=2, seed=1)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert {p.parent.name for p in first} == {"class00", "class01"}


def test_bench_quick_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--quick", "--n", "40", "--passes", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    # a second run in the same workdir, two passes each: every repeated conversion starts from a clean slate
    assert main(["--quick", "--n", "40", "--passes", "2", "--sections", "conversion", "--workdir", str(tmp_path / "w"),
                 "--out", str(tmp_path / "again.json")]) == 0
    results = json.loads(out.read_text())
    assert results["n"] == 40
    ratios = {**results["reading"]["ratios"], **results["conversion"]["ratios"]}
    warm = {name for name in TARGETS if "disk" not in name and "sequential" not in name}
    assert warm <= set(ratios) and all(value > 0 for value in ratios.values())
    assert len(results["scale"]["loader_memory"]) == 3
    assert [row["n"] for row in results["scale"]["conversion"]] == [10, 20, 40]
    training = results["training"]
    assert training["n"] == 40 and len(training["memory"]["CaffeLoader float32"]) == 3
    assert all(training[name]["ratio"] > 0 for name in ("uint8 / floor", "float32 / today", "encoded / today"))
    table = capsys.readouterr().out
    assert "D/C" in table and "raw w2/w1" in table and "epoch 2" in table
    assert "training path: N=40" in table and "float32 / today" in table
    continuing = results["continuing"]
    assert continuing["images"] == 40 and len(continuing["resume / full run"]["runs"]) == 1
    assert continuing["write_dataset / convert"]["median"] > 0 and continuing["resume / full run"]["median"] > 0
    assert "killed at 60% + --resume" in table
    instant = results["instant"]
    assert instant["keys"] == 160 and len(instant["second / first"]["runs"]) == 3
    assert "instant start: 160 keys" in table
    resume = results["resume"]
    assert resume["records"] == 200 and len(resume["resume s"]) == 3 and resume["resume / read 1%"] > 0
    assert resume["epoch with state_dict / without"]["median"] > 0 and resume["state_dict us"]["shuffle"] > 0
    assert resume["sampler"]["records"] == 10_000 and resume["sampler"]["8 -> 4 ranks ms"] > 0
    assert "resume: 200 records" in table and "resume / read 1%" in table
    encoded = results["encoded"]
    assert encoded["n"] == 40 and encoded["passes"] == 1
    for part in ("train", "eval"):
        ratios = encoded[part]["ratios"]
        assert len(ratios) == 2 and all(value["median"] > 0 and len(value["runs"]) == 1 for value in ratios.values())
    for part in ("pixels train", "pixels eval"):  # the fused decode's pixels stay within a third of a level
        assert encoded[part]["records"] == 40 and encoded[part]["mean abs"] <= 0.35
    assert abs(sum(encoded["dct scales"].values()) - 1) < 1e-9
    fast = encoded["fast resize"]
    assert fast["images"] == 4 and fast["plain / fast"]["median"] > 0 and 0 < fast["mean abs"] < 1
    assert "encoded training path: N=40 JPEGs" in table and "train 1 process / Pillow" in table
