"""The communication counts behind the scaling model (observability/comm.py,
scripts/bench_scale.py, scripts/scale_model.py): known collectives at 4 and 8 gloo ranks
against a hand count, and the bench and the model end to end at 2 and 4 ranks."""

from __future__ import annotations

import csv
import sys

import pytest

from tests.conftest import ROOT, run_cmd, run_worker

pytestmark = pytest.mark.dist
WORKER = str(ROOT / "tests" / "dist" / "comm_worker.py")


@pytest.mark.parametrize("world", [4, 8])
def test_counts_match_a_hand_count(tmp_path, world):
    got = run_worker(world, WORKER, tmp_path)
    others = world - 1
    for r, c in enumerate(got):
        assert c["gather"] | {"seconds": 0} == {
            "calls": 1,
            "sent": 24 * others,
            "received": 24 * others,
            "seconds": 0,
        }
        assert (c["broadcast"]["sent"], c["broadcast"]["received"]) == (
            (40 * others, 0) if r == 1 else (0, 40)
        )
        row_bytes = 8  # 2 float32
        sent = sum(j + 1 for j in range(world) if j != r) * row_bytes
        assert (c["all_to_all"]["sent"], c["all_to_all"]["received"]) == (
            sent,
            others * (r + 1) * row_bytes,
        )
        assert c["all_reduce"]["sent"] == c["all_reduce"]["received"] == 40 * others
        assert c["objects"]["calls"] == 2  # the sizes, then the pickled objects
    for phase in got[0]:  # over the group, what is sent is received
        sent = sum(c[phase]["sent"] for c in got)
        assert sent == sum(c[phase]["received"] for c in got) > 0, phase


def test_bench_and_model_run(tmp_path):
    scripts = ROOT / "scripts"
    bench = [sys.executable, str(scripts / "bench_scale.py"), "--ranks", "2", "4"]
    bench += ["--steps", "1", "--samples", "8", "--model-mb", "4", "--csv", str(tmp_path / "s.csv")]
    proc = run_cmd(bench, cwd=scripts, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    phases = {(int(r["ranks"]), r["phase"]) for r in rows}
    for world in (2, 4):
        assert {(world, p) for p in ("agreement", "redistribute", "metrics", "weights")} <= phases
    meta = {
        int(r["ranks"]): int(r["received_max"])
        for r in rows
        if r["collective"] == "all_gather_single" and r["phase"] == "redistribute"
    }
    assert meta[4] > meta[2] > 0  # every rank learns every sample's length and group
    model = [sys.executable, str(scripts / "scale_model.py"), "--measured", str(tmp_path / "s.csv")]
    model += ["--plot", str(tmp_path / "m.png")]
    proc = run_cmd(model, cwd=scripts, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "72B" in proc.stdout and (tmp_path / "m.png").stat().st_size > 0
