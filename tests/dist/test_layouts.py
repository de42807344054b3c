"""Every layout the schema accepts runs for a few steps through the real entrypoint on gloo,
or is refused on every rank before any model is built, naming the setting:

- rollout.tp = parallel.tp = 2 on 4 ranks (same replicas: a broadcast, not a skip);
- PP2 x VPP2 with token-budget micro-batches of different sample counts, equal to PP1;
- PP4 under PPO, each stage getting only the fields it reads, equal to DP4;
- sequence packing on PP2 and on TP2 with sequence parallel, equal to one sample per row
  (less padding);
- TP2 with sequence parallel, equal to TP2 (and the actor's log-probs equal the engine's,
  which are transformers' own);
- empty replicas: 2 groups over 4 training replicas (PPO: critic, GAE whitening over DP);
- refusals: parallel.cp > 1, and an SGLang rollout TP group spanning two torchrun nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from distflow_mc.data.tiny import make_task
from tests.conftest import ROOT, SHORT_RUN, main_cmd, rank_logs, run_cmd, run_nodes
from tests.tiny_hf import make_tiny_model

pytestmark = pytest.mark.dist
# an entropy bonus gives a gradient from the first step on (rewards start near 0)
SHORT = [*SHORT_RUN, "algo.entropy_coef=0.01"]
COMPARED = ("actor/grad_norm", "actor/entropy", "actor/pg_loss")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = make_task(tmp_path_factory.mktemp("task"))
    config = AutoConfig.from_pretrained(root / "tiny_llama")
    config.num_hidden_layers = 4  # PP2 x VPP2 needs 4 layers
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "tiny4")
    ids = {k: getattr(config, k) for k in ("vocab_size", "bos_token_id", "eos_token_id")}
    make_tiny_model("qwen3_moe", root / "tiny_moe", pad_token_id=config.pad_token_id, **ids)
    rows = pq.read_table(root / "tiny_task" / "train.parquet").to_pylist()[:64]
    with (root / "half_bad.jsonl").open("w") as f:
        for i, row in enumerate(rows):  # every other row is malformed (skipped)
            f.write(json.dumps({**row, "data_source": None} if i % 2 else row) + "\n")
    with (root / "mixed_lengths.jsonl").open("w") as f:
        for i, row in enumerate(rows):  # every other prompt is long: short ones can pair up
            long = [{**m, "content": "x " * 24 + m["content"]} for m in row["prompt"]]
            f.write(json.dumps({**row, "prompt": long} if i % 2 else row) + "\n")
    return root


def train(task: Path, run_dir: Path, nproc: int, *overrides: str) -> list[dict]:
    cmd = main_cmd(
        nproc, "experiment=cpu_tiny_grpo", *SHORT, f"hydra.run.dir={run_dir}", *overrides
    )
    out = run_cmd(cmd, cwd=ROOT, timeout=300, env={"DISTFLOW_DATA_DIR": str(task)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_first_step(a: list[dict], b: list[dict]) -> None:
    """Same rollout, same math: the first update agrees to float tolerance."""
    for key in COMPARED:
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-6), key


def test_rollout_tp_equal_to_train_tp(task, tmp_path):
    rows = train(task, tmp_path, 4, "rollout.tp=2", "parallel.tp=2")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in rows)
    assert all(r["actor/grad_norm"] > 0 for r in rows)


def test_interleaved_pipeline_with_uneven_microbatches(task, tmp_path):
    model = [f"model.path={task / 'tiny4'}", f"data.tokenizer={task / 'tiny_llama'}"]
    small = "trainer.micro_batch_tokens=50"  # ~16 samples of ~10 tokens: uneven micro-batches
    flat = train(task, tmp_path / "pp1", 2, *model, small)
    piped = train(task, tmp_path / "pp2vpp2", 2, *model, small, "parallel.pp=2", "parallel.vpp=2")
    assert_same_first_step(piped, flat)
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in piped)


def test_sequence_packing_equals_one_sample_per_row(task, tmp_path):
    """Packed rows (several samples per row, each with its own positions, attending only
    to itself) on PP=2, and on TP=2 with sequence parallel, with per-sequence loss means:
    the first update equals one sample per row's, the actor's log-probs equal
    transformers' own (the rollout engine's), and the micro-batches carry less padding."""
    model = [f"model.path={task / 'tiny4'}", f"data.tokenizer={task / 'tiny_llama'}"]
    common = [
        *model,
        f"data.train_files=[{task / 'mixed_lengths.jsonl'}]",
        "algo.loss_agg=SEQ_MEAN_TOKEN_MEAN",
        "trainer.total_steps=1",
    ]
    flat = train(task, tmp_path / "rows", 2, *common, "parallel.pp=2")
    packing = "trainer.sequence_packing=true"
    packed = train(task, tmp_path / "packed", 2, *common, "parallel.pp=2", packing)
    assert_same_first_step(packed, flat)
    assert packed[0]["rollout/logprob_gap_max"] < 1e-4
    assert packed[0]["actor/microbatch_padding"] < flat[0]["actor/microbatch_padding"]
    # TP=2 under sequence parallel: rows padded to a multiple of TP, attention heads split
    sp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    packed_sp = train(task, tmp_path / "packed_sp", 2, *common, *sp, packing)
    assert_same_first_step(packed_sp, flat)
    assert packed_sp[0]["rollout/logprob_gap_max"] < 1e-4


def test_pipeline_stages_get_only_what_they_read(task, tmp_path):
    """PPO (reference, critic, GAE whitened over DP, old log-probs for several epochs) on
    PP=4: the first stage receives the tokens only, the middle stages no fields, and only
    the last holds the passes' outputs and the advantages; the first update equals DP=4's."""
    model = [f"model.path={task / 'tiny4'}", f"data.tokenizer={task / 'tiny_llama'}"]
    ppo = ["experiment=cpu_tiny_ppo", "data.val_files=[]", "trainer.total_steps=1"]
    flat = train(task, tmp_path / "dp4", 4, *model, *ppo)
    piped = train(task, tmp_path / "pp4", 4, *model, *ppo, "parallel.pp=4")
    assert_same_first_step(piped, flat)
    assert piped[0]["critic/value_loss"] == pytest.approx(flat[0]["critic/value_loss"], rel=1e-5)


def test_sequence_parallel_equals_tensor_parallel(task, tmp_path):
    tp = train(task, tmp_path / "tp2", 2, "parallel.tp=2")
    sp = train(task, tmp_path / "sp", 2, "parallel.tp=2", "parallel.sequence_parallel=true")
    assert_same_first_step(sp, tp)
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in sp)


def test_empty_replicas_take_part(task, tmp_path):
    """Rows alternate good/malformed and are read in order: ranks 1 and 3 get no prompt,
    so 2 groups meet 4 training replicas; PPO whitens advantages over all of them."""
    rows = train(
        task,
        tmp_path,
        4,
        "experiment=cpu_tiny_ppo",
        "data.shuffle=false",
        f"data.train_files=[{task / 'half_bad.jsonl'}]",
        "data.val_files=[]",
    )
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["data/malformed_rows"] == 2 and r["rollout/groups"] == 0.5
        assert 0 < r["actor/grad_norm"] < float("inf") and r["critic/value_loss"] >= 0


def test_moe_with_expert_parallel_trains(task, tmp_path):
    """A tiny Qwen3-MoE, its experts split over EP=2: GRPO steps run with the router's
    load-balancing loss on, weight sync keeps the engine exact, router statistics logged."""
    rows = train(
        task,
        tmp_path,
        2,
        f"model.path={task / 'tiny_moe'}",
        f"data.tokenizer={task / 'tiny_llama'}",
        "parallel.ep=2",
        "model.router_aux_loss_coef=0.01",
        "trainer.total_steps=3",
    )
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 < r["actor/grad_norm"] < float("inf")
        assert r["rollout/logprob_gap_max"] < 1e-4
        assert r["actor/router_load_max_over_mean"] >= 1.0
        assert 0 <= r["actor/router_idle_expert_frac"] < 1


def test_on_policy_shortcut_equals_the_separate_pass(task, tmp_path):
    """One optimizer step per batch: the planner drops the ACTOR log-prob pass and the loss
    takes the training forward's detached log-probs. Forcing the pass back (a node with its
    own fn is never dropped) gives the same loss, gradient and log-prob gap."""
    kept = "algo.workflow.3.fn=distflow_mc.stages.passes.old_logprobs"  # actor_log_prob
    short = train(task, tmp_path / "short", 2, "trainer.total_steps=1")
    full = train(task, tmp_path / "full", 2, "trainer.total_steps=1", kept)
    assert "time/actor_log_prob" not in short[0] and "time/actor_log_prob" in full[0]
    assert_same_first_step(short, full)
    assert short[0]["actor/clip_frac"] == full[0]["actor/clip_frac"] == 0.0
    for key in ("rollout/logprob_gap_mean", "rollout/logprob_gap_max"):
        assert short[0][key] == pytest.approx(full[0][key], abs=1e-6)


def test_context_parallel_is_refused_on_every_rank(tmp_path):
    """Each rank refuses on its own, in its own log file, before any collective."""
    args = ["parallel.cp=2", "parallel.timeout_s=30", f"hydra.run.dir={tmp_path}"]
    for code, _ in run_nodes(2, args, cwd=tmp_path):
        assert code != 0
    for log in rank_logs(tmp_path, 2):
        assert "parallel.cp: context parallelism is not supported" in log, log


def test_sglang_rollout_group_across_nodes_is_refused(tmp_path):
    """Two torchrun agents (two 'nodes' of one rank each) meet through c10d rendezvous; a
    rollout TP group of 2 would span them: both refuse before any collective."""
    args = ["rollout=sglang", "rollout.tp=2", "parallel.timeout_s=30", f"hydra.run.dir={tmp_path}"]
    for code, _ in run_nodes(2, args, cwd=tmp_path):
        assert code != 0
    for log in rank_logs(tmp_path, 2):
        assert "rollout.tp=2 would make a rollout TP group span nodes (1 ranks per node)" in log
