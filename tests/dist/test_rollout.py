"""Weight sync on real ranks: after a training step of the Megatron actor at TP=2 and a sync
into a transformers engine on each rank (rollout TP=1), the engine's greedy output equals
the actor's, and their log-probs agree (the mismatch guard's metric)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, TORCHRUN, run_cmd
from tests.tiny_hf import make_tiny_model

pytestmark = pytest.mark.dist


def test_sync_after_training_step(tmp_path):
    model = make_tiny_model("llama", tmp_path / "llama")
    worker = str(ROOT / "tests" / "dist" / "rollout_worker.py")
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc-per-node=2",
        worker,
        "--model",
        str(model),
        "--out",
        str(tmp_path),
    ]
    proc = run_cmd(cmd, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["engine_equals_actor"], (r["engine"], r["actor"])
        assert r["changed_by_training"]  # the sync carried new weights, not the old ones
        assert r["gap_max"] < 1e-4, r
        # HF export of the trained actor: transformers loads it and gives the actor's logits
        assert r["export_logits_maxdiff"] < 1e-4, r
        assert "model.safetensors.index.json" in r["export_files"]
        assert "config.json" in r["export_files"]


def test_weights_stream_to_the_ranks_of_another_group(tmp_path):
    """rollout.placement=SEPARATE's weight path: a train rank streams its (trained) HF-named
    buckets to the rollout ranks over a group of the three (a fourth rank takes no part):
    odd sizes and mixed dtypes arrive bit-identical and aligned, each engine's weights
    equal the sender's bit for bit, and greedy decodes match the sender's."""
    model = make_tiny_model("llama", tmp_path / "llama")
    worker = str(ROOT / "tests" / "dist" / "stream_worker.py")
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=4", worker, "--model", str(model)]
    proc = run_cmd([*cmd, "--out", str(tmp_path)], cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert results[1] == {}
    for r in results[2:]:
        assert r["odd_exact"] and r["bitwise"], r
        assert r["responses"] == results[0]["responses"]
