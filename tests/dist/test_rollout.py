"""Weight sync on real ranks: after a training step of the Megatron actor at TP=2 and a sync
into a transformers engine on each rank (rollout TP=1), the engine's greedy output equals
the actor's, and their log-probs agree (the mismatch guard's metric)."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_worker
from tests.tiny_hf import make_tiny_model

pytestmark = pytest.mark.dist


def test_sync_after_training_step(tmp_path):
    model = make_tiny_model("llama", tmp_path / "llama")
    worker = ROOT / "tests" / "dist" / "rollout_worker.py"
    for r in run_worker(2, worker, tmp_path, "--model", str(model), timeout=240):
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
    worker = ROOT / "tests" / "dist" / "stream_worker.py"
    results = run_worker(4, worker, tmp_path, "--model", str(model), timeout=240)
    assert results[1] == {}
    for r in results[2:]:
        assert r["odd_exact"] and r["bitwise"], r
        assert r["responses"] == results[0]["responses"]
