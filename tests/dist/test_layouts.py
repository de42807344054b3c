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
- off-policy correction (TIS, token and sequence MIS) against an exact engine: no change;
- context parallelism (CP=2; CP=2 x TP=2 with sequence parallel under PPO), equal to DP;
- refusals: what CP does not run yet, and an SGLang rollout TP group spanning two torchrun
  nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, LlamaForCausalLM

from distflow_mc.data.tiny import make_task
from tests.conftest import SHORT_RUN, compose_config, rank_logs, run_nodes, run_sweep
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


def assert_same_first_step(a: list[dict], b: list[dict], case: str = "") -> None:
    """Same rollout, same math: the first update agrees to float tolerance."""
    for key in COMPARED:
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-6), (case, key)


def cases_on_two_ranks(task: Path) -> dict[str, list[str]]:
    tiny4 = [f"model.path={task / 'tiny4'}", f"data.tokenizer={task / 'tiny_llama'}"]
    small = "trainer.micro_batch_tokens=50"  # ~16 samples of ~10 tokens: uneven micro-batches
    mixed = [
        *tiny4,
        f"data.train_files=[{task / 'mixed_lengths.jsonl'}]",
        "algo.loss_agg=SEQ_MEAN_TOKEN_MEAN",
        "trainer.total_steps=1",
    ]
    packing, sp = (
        "trainer.sequence_packing=true",
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
    )
    corrected = ["algo.tis_cap=2.0", "algo.mis_low=0.5", "algo.mis_high=2.0"]
    gspo = ["algo.policy_loss=GSPO", "algo.loss_agg=SEQ_MEAN_TOKEN_SUM"]
    moe = [
        f"model.path={task / 'tiny_moe'}",
        f"data.tokenizer={task / 'tiny_llama'}",
        "parallel.ep=2",
        "model.router_aux_loss_coef=0.01",
    ]
    workflow = OmegaConf.to_container(compose_config().algo.workflow, enum_to_str=True)
    workflow[3]["fn"] = "distflow_mc.stages.passes.old_logprobs"  # a node with its own fn stays
    return {
        "pp1": [*tiny4, small, FLAT],
        "pp2vpp2": [*tiny4, small, "parallel.pp=2", "parallel.vpp=2"],
        "rows": [*mixed, "parallel.pp=2", FLAT],
        "packed": [*mixed, "parallel.pp=2", packing],
        "packed_sp": [*mixed, *sp, packing],
        "tp2": ["parallel.tp=2"],
        "sp": sp,
        "moe": [*moe, "trainer.total_steps=3"],
        "on_policy": ["trainer.total_steps=1"],
        "on_policy_corrected": ["trainer.total_steps=1", *corrected],
        "epochs2": ["trainer.total_steps=1", "algo.ppo_epochs=2"],
        "epochs2_corrected": [
            "trainer.total_steps=1",
            "algo.ppo_epochs=2",
            *corrected,
            "algo.mis_level=SEQUENCE",
        ],
        "forced_pass": ["trainer.total_steps=1", f"algo.workflow={json.dumps(workflow)}"],
        # trainer.shared_prefix: each group's prompt once per row, against the flat rows
        "shared_pp1": [*tiny4, small, SHARED],
        "shared_pp2vpp2": [*tiny4, small, "parallel.pp=2", "parallel.vpp=2", SHARED],
        "shared": [*mixed, "parallel.pp=2", SHARED],
        "shared_sp_split": [*mixed, *sp, SHARED, "trainer.micro_batch_tokens=60"],
        "rows_gspo": [*mixed, "parallel.pp=2", *gspo, FLAT],
        "shared_packed_gspo": [*mixed, "parallel.pp=2", *gspo, SHARED, packing],
        # (the router's load-balancing loss counts the tokens it routes: a prompt once here,
        # n times in flat rows, so it is compared without that loss)
        "moe_noaux": [*moe, "model.router_aux_loss_coef=0", "trainer.total_steps=1", FLAT],
        "moe_shared": [*moe, "model.router_aux_loss_coef=0", "trainer.total_steps=1", SHARED],
        "agent": [*AGENT, FLAT],
        "agent_shared": [*AGENT, SHARED],
        "agent_shared_cp2": [*AGENT, SHARED, "parallel.cp=2"],
        "cp2": ["trainer.total_steps=2", "parallel.cp=2", FLAT, "model.layer_spec=LOCAL"],
        # the distributed optimizer shards Adam's state over DP x CP: here the CP pair
        "cp2_distopt": [
            *["trainer.total_steps=2", "parallel.cp=2", FLAT],
            "trainer.actor_optim.distributed_optimizer=true",
        ],
        # trainer.recompute: activations made again in the backward pass, the same update
        "cp2_recompute": ["trainer.total_steps=1", "parallel.cp=2", "trainer.recompute=FULL"],
        # packed rows under CP: each token attends within its own sample, by row position
        "cp2_packed": [*mixed, "parallel.cp=2", packing],
        # megatron's selective recompute (the MLPs and norms again), with span rows
        "cp2_packed_selective": [*mixed, "parallel.cp=2", packing, "trainer.recompute=SELECTIVE"],
        "shared_selective": [*mixed, "parallel.pp=2", SHARED, "trainer.recompute=SELECTIVE"],
        # megatron's full recompute saves the span plan (a tensor) and attends again
        "shared_packed_full": [*mixed, "parallel.pp=2", SHARED, packing, "trainer.recompute=FULL"],
        "cp2_shared_full": [*mixed, "parallel.cp=2", SHARED, "trainer.recompute=FULL"],
        # shared-prefix rows under CP: a sample's tokens attend to its group's prompt too
        "cp2_shared": [*mixed, "parallel.cp=2", SHARED],
        # per-sequence rules under CP: GSPO's sequence ratio, per-sequence sums, MIS over
        # whole sequences, each sequence counted once (against the same on DP=2)
        "cp2_sequences": [*mixed, *gspo, *corrected, "algo.mis_level=SEQUENCE", "parallel.cp=2"],
        "sequences": [*mixed, *gspo, *corrected, "algo.mis_level=SEQUENCE", FLAT],
    }


SHARED = "trainer.shared_prefix=ALWAYS"
FLAT = "trainer.shared_prefix=NEVER"  # (the default, AUTO, shares where it pays)
TP2_SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
# multi-turn samples: prompt, turn, tool result, turn (the shared part: the prompt)
AGENT = ["experiment=cpu_tiny_agent", "data.val_files=[]", "trainer.total_steps=1"]


def cases_on_four_ranks(task: Path) -> dict[str, list[str]]:
    tiny4 = [f"model.path={task / 'tiny4'}", f"data.tokenizer={task / 'tiny_llama'}"]
    ppo = ["experiment=cpu_tiny_ppo", "data.val_files=[]", "trainer.total_steps=1"]
    moe_flat = [
        f"model.path={task / 'tiny_moe'}",
        f"data.tokenizer={task / 'tiny_llama'}",
        "trainer.total_steps=1",
        FLAT,
    ]
    return {
        "rollout_tp2": ["rollout.tp=2", "parallel.tp=2"],
        "ppo_dp4": [*tiny4, *ppo, FLAT],
        "ppo_pp4": [*tiny4, *ppo, "parallel.pp=4"],
        "ppo_pp4_shared": [*tiny4, *ppo, "parallel.pp=4", SHARED],
        "ppo_cp2_tp2_sp": [*tiny4, *ppo, "parallel.cp=2", *TP2_SP],
        # experts over EP=2 with CP=2 (and without), no load-balancing loss (refused under CP)
        "moe_ep2": [*moe_flat, "parallel.ep=2"],
        "moe_cp2_ep2": [*moe_flat, "parallel.ep=2", "parallel.cp=2"],
        # CP over an interleaved pipeline: views per stage, fixed p2p shapes of the chunks,
        # micro-batches of different lengths padded to one (a 40-token budget per rank)
        "ppo_cp2_pp2_vpp2": [
            *[*tiny4, *ppo, "parallel.cp=2", "parallel.pp=2", "parallel.vpp=2"],
            "trainer.micro_batch_tokens=40",
        ],
        "empty_replicas": [
            "experiment=cpu_tiny_ppo",
            "data.shuffle=false",
            f"data.train_files=[{task / 'half_bad.jsonl'}]",
            "data.val_files=[]",
        ],
    }


def sweep(task: Path, out: Path, ranks: int, cases: dict[str, list[str]]) -> dict:
    """Every run on `ranks` ranks, one sweep in one launch."""
    common = ["experiment=cpu_tiny_grpo", *SHORT]
    env = {"DISTFLOW_DATA_DIR": str(task)}
    return run_sweep(ranks, {k: [*common, *v] for k, v in cases.items()}, out, env)


@pytest.fixture(scope="module")
def two(task, tmp_path_factory) -> dict[str, list[dict]]:
    return sweep(task, tmp_path_factory.mktemp("two"), 2, cases_on_two_ranks(task))


@pytest.fixture(scope="module")
def four(task, tmp_path_factory) -> dict[str, list[dict]]:
    return sweep(task, tmp_path_factory.mktemp("four"), 4, cases_on_four_ranks(task))


def test_rollout_tp_equal_to_train_tp(four):
    rows = four["rollout_tp2"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in rows)
    assert all(r["actor/grad_norm"] > 0 for r in rows)


def test_interleaved_pipeline_with_uneven_microbatches(two):
    assert_same_first_step(two["pp2vpp2"], two["pp1"])
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in two["pp2vpp2"])


def test_sequence_packing_equals_one_sample_per_row(two):
    """Packed rows (several samples per row, each with its own positions, attending only
    to itself) on PP=2, and on TP=2 with sequence parallel, with per-sequence loss means:
    the first update equals one sample per row's, the actor's log-probs equal
    transformers' own (the rollout engine's), and the micro-batches carry less padding."""
    flat, packed, packed_sp = two["rows"], two["packed"], two["packed_sp"]
    assert_same_first_step(packed, flat)
    assert packed[0]["rollout/logprob_gap_max"] < 1e-4
    assert packed[0]["actor/microbatch_padding"] < flat[0]["actor/microbatch_padding"]
    # TP=2 under sequence parallel: rows padded to a multiple of TP, attention heads split
    assert_same_first_step(packed_sp, flat)
    assert packed_sp[0]["rollout/logprob_gap_max"] < 1e-4


def test_pipeline_stages_get_only_what_they_read(four):
    """PPO (reference, critic, GAE whitened over DP, old log-probs for several epochs) on
    PP=4: the first stage receives the tokens only, the middle stages no fields, and only
    the last holds the passes' outputs and the advantages; the first update equals DP=4's."""
    flat, piped = four["ppo_dp4"], four["ppo_pp4"]
    assert_same_first_step(piped, flat)
    assert piped[0]["critic/value_loss"] == pytest.approx(flat[0]["critic/value_loss"], rel=1e-5)


def test_shared_prefix_is_the_same_math(two, four):
    """trainer.shared_prefix=ALWAYS (each group's prompt once per row, every sample's tokens
    attending to it): the first update equals the flat rows' (grad norm, entropy, loss) and
    the actor's log-probs equal transformers' own (the engine's), on PP1 (token mean), an
    interleaved PP2 x VPP2, PP2 with prompts of different lengths (per-sequence means),
    TP2 with sequence parallel and groups split over rows by the token budget, GSPO with
    packed rows, experts over EP2, multi-turn agent samples (also at CP=2), packed rows and
    CP=2 under trainer.recompute=FULL, and PPO on PP4 (reference, critic values, several
    epochs)."""
    pairs = [  # (and the least share of the tokens not computed again)
        ("shared_pp1", "pp1", two, 0.2),
        ("shared_pp2vpp2", "pp1", two, 0.2),
        ("shared", "rows", two, 0.2),
        ("shared_sp_split", "rows", two, 0.01),  # a 60-token budget: rows of 2-3 samples
        ("shared_packed_gspo", "rows_gspo", two, 0.2),
        ("moe_shared", "moe_noaux", two, 0.2),
        ("agent_shared", "agent", two, 0.2),
        ("agent_shared_cp2", "agent", two, 0.2),  # and each CP rank's runs of the spans
        ("shared_packed_full", "rows", two, 0.2),  # under trainer.recompute=FULL
        ("cp2_shared_full", "rows", two, 0.2),
        ("ppo_pp4_shared", "ppo_dp4", four, 0.2),
    ]
    for shared, flat, runs, saved in pairs:
        on, off = runs[shared], runs[flat]
        assert_same_first_step(on, off, shared)
        assert on[0]["rollout/logprob_gap_max"] < 1e-4, shared
        assert on[0]["actor/shared_prefix_saved"] > saved, shared
        assert off[0]["actor/shared_prefix_saved"] == 0, flat
    ppo, ppo_flat = four["ppo_pp4_shared"][0], four["ppo_dp4"][0]
    assert ppo["critic/value_loss"] == pytest.approx(ppo_flat["critic/value_loss"], rel=1e-5)


def test_sequence_parallel_equals_tensor_parallel(two):
    assert_same_first_step(two["sp"], two["tp2"])
    assert all(r["rollout/logprob_gap_max"] < 1e-4 for r in two["sp"])


def test_empty_replicas_take_part(four):
    """Rows alternate good/malformed and are read in order: ranks 1 and 3 get no prompt,
    so 2 groups meet 4 training replicas; PPO whitens advantages over all of them."""
    rows = four["empty_replicas"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["data/malformed_rows"] == 2 and r["rollout/groups"] == 0.5
        assert 0 < r["actor/grad_norm"] < float("inf") and r["critic/value_loss"] >= 0


def test_moe_with_expert_parallel_trains(two):
    """A tiny Qwen3-MoE, its experts split over EP=2: GRPO steps run with the router's
    load-balancing loss on, weight sync keeps the engine exact, router statistics logged."""
    rows = two["moe"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 < r["actor/grad_norm"] < float("inf")
        assert r["rollout/logprob_gap_max"] < 1e-4
        assert r["actor/router_load_max_over_mean"] >= 1.0
        assert 0 <= r["actor/router_idle_expert_frac"] < 1


def test_on_policy_shortcut_equals_the_separate_pass(two):
    """One optimizer step per batch: the planner drops the ACTOR log-prob pass and the loss
    takes the training forward's detached log-probs. Forcing the pass back (a node with its
    own fn is never dropped) gives the same loss, gradient and log-prob gap."""
    short, full = two["on_policy"], two["forced_pass"]
    assert "time/actor_log_prob" not in short[0] and "time/actor_log_prob" in full[0]
    assert_same_first_step(short, full)
    assert short[0]["actor/clip_frac"] == full[0]["actor/clip_frac"] == 0.0
    for key in ("rollout/logprob_gap_mean", "rollout/logprob_gap_max"):
        assert short[0][key] == pytest.approx(full[0][key], abs=1e-6)


def test_behaviour_correction_against_an_exact_engine_changes_nothing(two):
    """The engine's log-probs are transformers' own, equal to the actor's: every importance
    weight is 1 (within float noise), nothing is truncated or left out, and the first
    update equals the uncorrected one, on-policy (the training forward is the proximal
    policy) and with a separate old-log-prob pass (two epochs, sequence-level masking)."""
    for plain, corrected in (
        ("on_policy", "on_policy_corrected"),
        ("epochs2", "epochs2_corrected"),
    ):
        first = two[corrected][0]
        assert_same_first_step(two[corrected], two[plain])
        assert first["actor/is_weight"] == pytest.approx(1.0, abs=1e-5)
        assert first["actor/is_weight_max"] == pytest.approx(1.0, abs=1e-5)
        assert first["actor/is_truncated_frac"] == first["actor/is_masked_frac"] == 0.0
        assert "actor/is_weight" not in two[plain][0]


def test_context_parallel_equals_data_parallel(two, four):
    """parallel.cp=2 (each rank two of the four chunks of every sample's two segments, K and V
    gathered over the CP group): the first update equals the same batch's over DP ranks,
    and the actor's log-probs equal transformers' own, also after a step's weights
    reached the engine; the distributed optimizer sharded over the CP pair takes the
    same second step; GRPO on 2 ranks (also with GSPO, per-sequence sums and sequence-
    level MIS, with trainer.recompute=FULL, and with packed and shared-prefix rows on
    prompts of mixed lengths, packed also under trainer.recompute=SELECTIVE, and shared-
    prefix rows under it without CP), and PPO (reference and critic passes, values,
    several epochs) on 4 ranks with CP=2 x TP=2 under sequence parallel and with CP=2
    over an interleaved pipeline (PP=2 x VPP=2); experts over EP=2 with CP=2 equal them
    without CP."""
    assert_same_first_step(two["cp2"], two["on_policy"], "cp2")
    for key in COMPARED:  # the second step starts from the sharded optimizer's update
        assert two["cp2_distopt"][1][key] == pytest.approx(two["cp2"][1][key], rel=1e-5), key
    assert_same_first_step(two["cp2_sequences"], two["sequences"], "cp2_sequences")
    assert_same_first_step(two["cp2_recompute"], two["on_policy"], "cp2_recompute")
    assert_same_first_step(two["cp2_packed"], two["rows"], "cp2_packed")
    assert_same_first_step(two["cp2_packed_selective"], two["rows"], "cp2_packed_selective")
    assert_same_first_step(two["shared_selective"], two["rows"], "shared_selective")
    assert_same_first_step(two["cp2_shared"], two["rows"], "cp2_shared")
    assert two["cp2_shared"][0]["actor/shared_prefix_saved"] > 0.2
    assert max(step["rollout/logprob_gap_max"] for step in two["cp2"]) < 1e-4
    cp, flat = four["ppo_cp2_tp2_sp"], four["ppo_dp4"]
    assert_same_first_step(cp, flat, "ppo_cp2_tp2_sp")
    assert cp[0]["critic/value_loss"] == pytest.approx(flat[0]["critic/value_loss"], rel=1e-5)
    assert_same_first_step(four["moe_cp2_ep2"], four["moe_ep2"], "moe_cp2_ep2")
    piped = four["ppo_cp2_pp2_vpp2"]
    assert_same_first_step(piped, flat, "ppo_cp2_pp2_vpp2")
    assert piped[0]["critic/value_loss"] == pytest.approx(flat[0]["critic/value_loss"], rel=1e-5)


def test_context_parallel_limits_are_refused_on_every_rank(tmp_path):
    """Each rank refuses what CP does not run yet on its own, in its own log file, before
    any collective, naming the setting."""
    args = ["parallel.cp=2", "model.router_aux_loss_coef=0.01", "parallel.timeout_s=30"]
    for code, _ in run_nodes(2, [*args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path):
        assert code != 0
    for log in rank_logs(tmp_path, 2):
        assert "model.router_aux_loss_coef: > 0 with parallel.cp > 1 is refused" in log


def test_sglang_rollout_group_across_nodes_is_refused(tmp_path):
    """Two torchrun agents (two 'nodes' of one rank each) meet through c10d rendezvous; a
    rollout TP group of 2 would span them: both refuse before any collective."""
    args = ["rollout=sglang", "rollout.tp=2", "parallel.timeout_s=30", f"hydra.run.dir={tmp_path}"]
    for code, _ in run_nodes(2, args, cwd=tmp_path):
        assert code != 0
    for log in rank_logs(tmp_path, 2):
        assert "rollout.tp=2 would make a rollout TP group span nodes (1 ranks per node)" in log
