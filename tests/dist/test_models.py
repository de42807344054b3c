"""Megatron models against transformers on tiny Llama/Qwen2/Qwen3 checkpoints and a tiny
Qwen2.5-VL (images and multimodal RoPE), at TP=1, TP=2 and PP=2; export round trip; critic;
one train step at DP=2 equal to DP=1. The one-rank checks
are one launch of tests/dist/model_worker.py, every 2-rank layout another (real processes
on gloo, hard timeouts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TORCHRUN, run_cmd
from tests.tiny_hf import make_tiny_model

pytestmark = pytest.mark.dist
WORKER = str(ROOT / "tests" / "dist" / "model_worker.py")
TOL = 1e-5  # fp32; observed ~4e-7
# weights after one step (lr 1e-3): Adam's first update is ~lr * sign(grad), so float noise
# in near-zero gradients shows; observed 2.9e-6, and 3.2e-4 when the clip is left out
STEP_TOL = 5e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_model("llama", root / "llama", max_shard_size="100KB")
    make_tiny_model("qwen2", root / "qwen2")
    make_tiny_model("qwen3", root / "qwen3")
    make_tiny_model("llama3", root / "llama3")
    make_tiny_model("qwen3_moe", root / "qwen3_moe")
    assert (root / "llama" / "model.safetensors.index.json").is_file()  # sharded load path
    assert (root / "qwen2" / "model.safetensors").is_file()  # single-file load path
    return root


def launch(models: Path, out: Path, *args: str) -> dict:
    """One job on one rank (plain python)."""
    cmd = [sys.executable, WORKER, "--models", str(models), "--out", str(out), *args]
    proc = run_cmd(cmd, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "rank0.json").read_text())


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> Path:
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("vl") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def dp1(models, vl, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("tp1")
    checks = "equivalence,critic,train,schedule,malformed,vl"
    return [launch(models, out, "--checks", checks, "--vl", str(vl))], out


KINDS = ("llama", "llama3", "qwen2", "qwen3", "qwen3_moe")


def assert_equivalent(result: dict, kinds: tuple[str, ...] = KINDS) -> None:
    for kind in kinds:
        for what in ("logits", "logp", "entropy"):
            assert result[f"{kind}_{what}_maxdiff"] < TOL, (kind, what, result)
        assert result[f"{kind}_export_keys_equal"], kind
        assert result[f"{kind}_export_bitwise"], kind


def assert_vl_equivalent(result: dict) -> None:
    """Logits and log-probs of every real token (a row with two images of different grids,
    a text-only row, a row with one image), the 3-D positions, the export round trip."""
    assert result["vl_logits_maxdiff"] < TOL and result["vl_logp_maxdiff"] < TOL, result
    assert result["vl_positions_maxdiff"] == 0
    assert result["vl_export_keys_equal"] and result["vl_export_bitwise"]
    assert result["vl_trained_only"]


def test_tp1_matches_transformers(dp1):
    (result,), _ = dp1
    assert_equivalent(result)
    assert_vl_equivalent(result)
    assert result["critic_shape"] == [2, 12]
    assert result["train_updated"]
    # one step equals transformers + torch.optim.AdamW + clip_grad_norm_, clipping included
    assert result["train_grad_norm"] == pytest.approx(result["torch_grad_norm"], rel=1e-5)
    assert result["torch_grad_norm"] > 1.0  # the clip (at 1.0) takes effect
    assert result["torch_step_maxdiff"] < STEP_TOL


def test_malformed_checkpoints_name_the_tensor(dp1):
    (result,), _ = dp1
    name = "model.layers.1.mlp.up_proj.weight"
    assert f"tensor '{name}' is missing from the checkpoint" in result["malformed_missing"]
    assert f"tensor '{name}' has shape (95, 64), expected (96, 64)" in result["malformed_shape"]


def test_lr_warms_up(dp1):
    (result,), _ = dp1
    assert result["lrs"] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3])


@pytest.fixture(scope="module")
def two_ranks(models, vl, tmp_path_factory) -> Path:
    """Every 2-rank job in one launch (each re-initialises model parallelism); results
    under <out>/<job>/."""
    out = tmp_path_factory.mktemp("two")
    moe, uneven = out / "moe_models", out / "uneven_models"
    make_tiny_model("qwen3_moe", moe / "qwen3_moe")
    make_tiny_model("qwen3", uneven / "qwen3", num_hidden_layers=3)
    equivalence = ["--checks", "equivalence"]
    uneven_args = ["--models", str(uneven), "--pp", "2", *equivalence]
    jobs = {
        "tp": ["--tp", "2"],
        "pp": ["--pp", "2"],
        "vpp": ["--pp", "2", "--vpp", "2"],
        "ep": ["--models", str(moe), "--ep", "2", *equivalence],
        "uneven_auto": uneven_args,
        "uneven_1": [
            "--models",
            str(uneven),
            "--pp",
            "2",
            *equivalence,
            "--first-stage-layers",
            "1",
        ],
        "cp": ["--cp", "2", *equivalence],
        "cp_ep": ["--models", str(moe), "--ep", "2", "--cp", "2", *equivalence],
        "vl_tp": ["--tp", "2", "--checks", "vl", "--vl", str(vl)],
        "vl_pp": ["--pp", "2", "--checks", "vl", "--vl", str(vl)],
        "dp2": ["--checks", "train"],
        "dp2_distributed_optimizer": ["--checks", "train", "--distributed-optimizer"],
    }
    listed = [["--models", str(models), "--out", str(out / name), *a] for name, a in jobs.items()]
    (out / "jobs.json").write_text(json.dumps(listed))
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=2", WORKER, "--jobs", str(out / "jobs.json")]
    proc = run_cmd(cmd, cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def results_of(two_ranks: Path, job: str) -> list[dict]:
    return [json.loads((two_ranks / job / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("layout", ["vl_tp", "vl_pp"])
def test_vision_language_model_at_two_ranks_matches_transformers(two_ranks, layout):
    """TP=2 (the vision tower replicated on both ranks) and PP=2 (it runs on the first
    stage; the outputs come from the second)."""
    first, last = results_of(two_ranks, layout)
    assert_vl_equivalent(last)
    assert first["vl_export_bitwise"]


@pytest.mark.parametrize("layout", ["tp", "pp", "vpp"])
def test_two_rank_layouts_match_transformers(two_ranks, dp1, layout):
    results_ = results_of(two_ranks, layout)
    last = results_[-1]  # last PP stage (and a TP rank) holds the outputs
    assert_equivalent(last)
    assert all(r["train_updated"] for r in results_)
    (single,), _ = dp1
    # Same data, same weights: the gradient norm of the step does not depend on the layout.
    assert last["train_grad_norm"] == pytest.approx(single["train_grad_norm"], rel=1e-5)
    if layout == "tp":
        assert last["critic_same_across_tp"]


def test_expert_parallel_matches_transformers(two_ranks):
    """Qwen3-MoE with its 4 experts split over EP=2 (2 ranks, DP=2): tokens cross ranks in
    megatron's all-to-all dispatcher, and export gathers every expert on every rank."""
    for result in results_of(two_ranks, "ep"):
        assert_equivalent(result, ("qwen3_moe",))


@pytest.fixture(scope="module")
def four_ranks(models, tmp_path_factory) -> Path:
    """Context parallelism beside TP (sequence parallel) and pipelines, in one launch."""
    out = tmp_path_factory.mktemp("four")
    jobs = {
        "cp_tp_sp": ["--cp", "2", "--tp", "2", "--sp"],
        "cp_pp": ["--cp", "2", "--pp", "2"],
        "cp_vpp": ["--cp", "2", "--pp", "2", "--vpp", "2"],
    }
    listed = [
        ["--models", str(models), "--out", str(out / name), "--checks", "equivalence", *a]
        for name, a in jobs.items()
    ]
    (out / "jobs.json").write_text(json.dumps(listed))
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=4", WORKER, "--jobs", str(out / "jobs.json")]
    proc = run_cmd(cmd, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("layout", ["cp", "cp_ep", "cp_tp_sp", "cp_pp", "cp_vpp"])
def test_context_parallel_layouts_match_transformers(two_ranks, four_ranks, layout):
    """parallel.cp=2 (each rank two of the four chunks of every sample's prompt part and
    rest, data/chunks.py; K and V gathered over the pair, mask-free attention), alone, with
    Qwen3-MoE's experts over EP=2, with TP=2 and sequence parallel, with PP=2 and
    interleaved PP=2 x VPP=2: logits, log-probs and entropies of every token a rank holds
    equal transformers' forward of its sample: rows of 12 tokens with prompts of 5 and 9,
    rows of 7 without (not a multiple of 2 x CP), packed rows (5 and 6 tokens in one, 7 in
    the other) and a group of three sharing a 6-token prompt in one row."""
    where = four_ranks if layout in ("cp_tp_sp", "cp_pp", "cp_vpp") else two_ranks
    ranks = 4 if where is four_ranks else 2
    results_ = [json.loads((where / layout / f"rank{r}.json").read_text()) for r in range(ranks)]
    kinds = ("qwen3_moe",) if layout == "cp_ep" else KINDS
    for result in results_:
        if "llama_logits_maxdiff" in result or "qwen3_moe_logits_maxdiff" in result:
            assert_equivalent(result, kinds)
    assert sum("qwen3_moe_logits_maxdiff" in r for r in results_) >= 2  # both CP ranks


@pytest.mark.parametrize("first", [None, 1])
def test_uneven_pipeline_matches_transformers(two_ranks, first):
    """3 layers over PP=2: split automatically (2 + 1) or as set (1 + 2)."""
    results_ = results_of(two_ranks, "uneven_1" if first else "uneven_auto")
    assert_equivalent(results_[-1], ("qwen3",))
    assert all(r["qwen3_export_bitwise"] and r["qwen3_export_keys_equal"] for r in results_)
    layers = [r["layers"] for r in results_]
    assert layers == ([[1, 2], [3]] if first is None else [[1], [2, 3]])


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_dp2_step_equals_dp1(two_ranks, dp1, distributed_optimizer):
    job = "dp2_distributed_optimizer" if distributed_optimizer else "dp2"
    # a NaN loss on one DP rank: every rank skips that optimizer step, no weight moves
    assert all(
        r["nonfinite_skipped"] and r["nonfinite_weights_kept"] for r in results_of(two_ranks, job)
    )
    _, single_out = dp1
    one = torch.load(single_out / "trained.pt")
    two = torch.load(two_ranks / job / "trained.pt")
    assert sorted(one) == sorted(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_on_a_group_of_the_world(models, tmp_path, two_ranks):
    """rollout.placement=SEPARATE's train group: on 4 ranks, megatron's groups cover ranks
    0-1 (TP=2) and ranks 2-3 hold nothing; the model equals transformers', its step equals
    the same layout's on a world of 2 bit for bit, it saves and loads a checkpoint over the
    group alone, and its first rank streams the weights to engines on ranks 2-3."""
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=4", WORKER, "--models", str(models)]
    checks = ["--checks", "equivalence,critic,train,checkpoint,stream"]
    args = ["--out", str(tmp_path), "--tp", "2", "--train-ranks", "2", *checks]
    proc = run_cmd([*cmd, *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert results[2] == results[3] == {"idle": True, "engine": True}
    assert_equivalent(results[1])
    world_of_two = results_of(two_ranks, "tp")[1]
    assert results[1]["train_grad_norm"] == world_of_two["train_grad_norm"]
    one, group = torch.load(two_ranks / "tp" / "trained.pt"), torch.load(tmp_path / "trained.pt")
    assert sorted(one) == sorted(group) and all(torch.equal(group[n], one[n]) for n in one)
    # dist_checkpointing over the group: a save and a load bring the weights back
    assert all(r["checkpoint_moved"] and r["checkpoint_restored"] for r in results[:2])
    # the weights the group exports reach engines on ranks 2-3 bit for bit (4 KB buckets)
    sent = torch.load(tmp_path / "sent.pt")
    for rank in (2, 3):
        engine = torch.load(tmp_path / f"engine{rank}.pt")
        assert all(torch.equal(engine[n], t) for n, t in sent.items()), rank
