"""``scripts/bench_scale.py`` on a tiny shape: one of tiny_llama's two blocks, two steps per mode (seconds).

Nothing about the measured values is asserted beyond their being positive (timing and RSS are the benchmark's job);
what is checked is the table's shape, the extrapolation rules of the script's docstring, recomputed here, and that
the random-weight config at the full depth plans exactly as the project's own ``model=tiny_llama``.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT, compose_cfg

from permsparse.plan import plan_run


def _bench_scale():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_scale
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return bench_scale


def test_bench_scale_measures_each_mode_and_extrapolates_by_its_rules(tmp_path):
    bench = _bench_scale()
    out, raw = tmp_path / "table.txt", tmp_path / "raw.json"
    assert bench.main(["model=tiny_llama", "--blocks", "1", "--steps", "2", "--out", str(out), "--json", str(raw)]) == 0

    lines = out.read_text().splitlines()
    for mode in ("e2e", "block"):
        for kind in ("measured", "full"):
            found = [line.split() for line in lines if line.split()[:2] == [mode, kind]]
            assert len(found) == 1, (mode, kind, lines)
            blocks, seconds, refresh = int(found[0][2]), float(found[0][3]), float(found[0][4])
            assert blocks == (1 if kind == "measured" else 2)
            assert seconds > 0 and refresh >= 0

    data = json.loads(raw.read_text())
    rows = {(r["mode"], r["kind"]): r for r in data["rows"]}
    assert set(rows) == {(m, k) for m in ("e2e", "block") for k in ("measured", "full")}
    for row in rows.values():
        assert row["seconds"] > 0 and row["flops"] > 0 and row["planned"] > 0 and row["peak"] > 0
        assert 0 <= row["refresh"] <= row["seconds"]
    assert rows["e2e", "measured"]["steps"] == 1 and rows["block", "measured"]["steps"] == 1  # 2 steps, 1 warm-up

    # the full-depth plan is the plan of the project's own tiny_llama config (its learning budget: 96 steps)
    for mode in ("e2e", "block"):
        plan = plan_run(compose_cfg(["model=tiny_llama", "dataset=tiny_text", "perm=learned", f"learning.mode={mode}"],
                                    tmp_path))
        full = rows[mode, "full"]
        assert full["planned"] == plan.total
        assert full["steps"] == plan.steps == 96
        assert full["flops"] == pytest.approx(sum(v for n, v, _ in plan.flops if not n.startswith("Hungarian")))

    # e2e: the refresh grows with the blocks, the rest with the planned FLOPs; the peak with the planned total
    m, f = rows["e2e", "measured"], rows["e2e", "full"]
    assert f["seconds"] == pytest.approx(m["refresh"] * 2 / 1 + (m["seconds"] - m["refresh"]) * f["flops"] / m["flops"])
    assert f["refresh"] == pytest.approx(m["refresh"] * 2)
    assert f["run_seconds"] == pytest.approx(f["seconds"] * 96)
    assert f["peak"] == pytest.approx(m["peak"] * f["planned"] / m["planned"], abs=1)
    assert f["flops"] > m["flops"]
    # block-local: a step is one block's, as measured; the run is steps x blocks; the device holds one block
    m, f = rows["block", "measured"], rows["block", "full"]
    assert f["seconds"] == m["seconds"] and f["peak"] == m["peak"] and f["planned"] == m["planned"]
    assert f["run_seconds"] == pytest.approx(m["seconds"] * 96 * 2)
    assert f["host"] > m["host"]  # the whole model and the full input cache stay on the host


def test_fitting_blocks_takes_the_most_that_fit_an_affine_need():
    bench = _bench_scale()
    need = lambda k: 10 + 3 * k  # noqa: E731
    assert bench.fitting_blocks(need, full=100, budget=25) == 5
    assert bench.fitting_blocks(need, full=4, budget=25) == 4
    assert bench.fitting_blocks(need, full=1, budget=13) == 1
    assert bench.fitting_blocks(need, full=100, budget=12) == 0
