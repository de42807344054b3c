"""rollout.placement=SEPARATE through the real entrypoint: 4 gloo ranks under torchrun, ranks
0-1 train while ranks 2-3 generate, in one sweep (one launch) of

- the colocated run with the same rollout replicas (rollout.tp=2: engines on ranks 0 and 2,
  rollout data-parallel ranks 0 and 1, the same prompts and sampling seeds),
- SEPARATE with trainer.max_staleness=0, which must be that run's math,
- SEPARATE one step off (k=1) and two steps off (k=2), which must learn the embedded task.

Measured on the 2-core machine: k=1 with algo.tis_cap=2 takes the reward from 0.042 (first
10 steps) to 0.33 (last 30) in 100 steps, k=2 from 0.038 to 0.33 (0.33 and 0.40 by step
150); the colocated run (2 ranks) from 0.049 to 0.45 in 150."""

from __future__ import annotations

import pytest
import torch

from distflow_mc.data.tiny import make_task
from tests.conftest import run_sweep

pytestmark = pytest.mark.dist

SEPARATE = ["rollout.placement=SEPARATE", "rollout.ranks=2"]
PRESET = ["placement=separate", "rollout.ranks=2"]
LEARN_STEPS = 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    task = make_task(tmp_path_factory.mktemp("task"))
    common = [
        "experiment=cpu_tiny_grpo",
        "trainer.val_every=0",
        "parallel.timeout_s=120",
        "trainer.progress_bar=false",
    ]
    cases = {
        "colocated": [*common, "trainer.total_steps=3", "rollout.tp=2", "trainer.val_every=2"],
        "k0": [
            *common,
            "trainer.total_steps=3",
            *SEPARATE,
            "trainer.max_staleness=0",
            "trainer.val_every=2",
        ],
        # the same from a context-parallel train group (CP=2): its weights reach the engine
        "k0_cp2": [
            *common,
            "trainer.total_steps=3",
            *SEPARATE,
            "trainer.max_staleness=0",
            "trainer.val_every=2",
            "parallel.cp=2",
        ],
        # the preset: one step off, truncated importance sampling at 2
        "k1": [*common, f"trainer.total_steps={LEARN_STEPS}", *PRESET, "trainer.val_every=50"],
        "k2": [*common, f"trainer.total_steps={LEARN_STEPS}", *PRESET, "trainer.max_staleness=2"],
        "k1n2": [*common, "trainer.total_steps=6", *PRESET, "trainer.weight_sync_every=2"],
        # one rank generates responses of ~40 tokens for three that train: generating a
        # batch takes longer than training one, so the next version arrives while the
        # rollout rank generates (measured: in 7 of the 8 steps that can see one, with
        # 75-98% of the samples still running)
        "partial": [
            *common,
            "trainer.total_steps=10",
            *PRESET,
            "rollout.ranks=1",
            "rollout.partial=true",
            "rollout.max_new_tokens=128",  # generations outlast a train step: updates cross them
        ],
        # the rest of the algorithms and layouts, a few steps each (agent turns take the
        # weights that arrive while they generate: rollout.partial)
        "agent": [
            *common,
            "experiment=cpu_tiny_agent",
            "trainer.total_steps=3",
            *PRESET,
            "rollout.agent.tools=[distflow_mc.data.tiny.SlowLookup]",
            "rollout.partial=true",
        ],
        "dapo": [
            *common,
            "trainer.total_steps=3",
            *PRESET,
            "algo.dynamic_sampling=true",
            "algo.policy_loss=GSPO",
        ],
        "ppo_tp2": [
            *common,
            "experiment=cpu_tiny_ppo",
            "trainer.total_steps=3",
            *PRESET,
            "parallel.tp=2",
            "algo.kl_coef=0.01",
            "trainer.export_hf=true",
        ],
        # one engine serves the rollout TP group from rank 2 (rank 3 holds none), to a
        # 2-stage pipeline whose first stage gets the tokens only
        "rollout_tp2_pp2": [
            *common,
            "trainer.total_steps=3",
            *PRESET,
            "rollout.tp=2",
            "parallel.pp=2",
        ],
    }
    env = {"DISTFLOW_DATA_DIR": str(task)}
    run_dir = tmp_path_factory.mktemp("runs")
    out = run_sweep(4, cases, run_dir, env, timeout=600)
    out["ppo_tp2_dir"] = run_dir / str(list(cases).index("ppo_tp2"))
    out["task"] = task
    return out


@pytest.mark.parametrize("case", ["k0", "k0_cp2"])
def test_staleness_zero_is_the_colocated_run(runs, case):
    """The same prompts, samples, rewards and updates: grad norms and losses within 1e-5;
    also when the train group runs context parallelism (k0_cp2)."""
    colocated, separate = runs["colocated"], runs[case]
    assert len(colocated) == len(separate) == 3
    for a, b in zip(colocated, separate, strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["rollout/generated_tokens"] == b["rollout/generated_tokens"]
        for key in ("actor/grad_norm", "actor/pg_loss", "actor/kl"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (b["step"], key)
        # the engine generated with the actor's weights of that very step
        assert b["rollout/logprob_gap_mean"] < 1e-4
        assert b["staleness/max"] == 0
    # validation of the final actor, on the rollout group: the colocated run's numbers
    val = {k: v for k, v in colocated[-1].items() if k.startswith("val/")}
    assert val and all(separate[-1][k] == pytest.approx(v, abs=1e-6) for k, v in val.items())
    assert separate[-1]["val/version"] == 3
    # version 2 would report in step 3's record, which the final actor's validation has
    assert not any(k.startswith("val/") for r in separate[:-1] for k in r)


@pytest.mark.parametrize("k", [1, 2])
def test_every_batch_is_exactly_k_versions_old_and_the_run_learns(runs, k):
    rows = runs[f"k{k}"]
    assert [r["step"] for r in rows] == list(range(1, LEARN_STEPS + 1))
    for r in rows:  # step t (from 1) trains on what version max(0, t - 1 - k) generated
        lag = min(r["step"] - 1, k)
        assert r["staleness/mean"] == r["staleness/max"] == lag, r["step"]
    # the engine lags the actor: its log-probs differ once the actor has moved past it
    assert all(r["rollout/logprob_gap_mean"] > 1e-4 for r in rows[k + 1 :])
    assert all(0 <= r["rollout/idle_frac"] <= 1 and 0 <= r["train/idle_frac"] <= 1 for r in rows)
    first = sum(r["reward/mean"] for r in rows[:10]) / 10
    last = sum(r["reward/mean"] for r in rows[-30:]) / 30
    assert last > max(0.25, first + 0.15), (k, first, last)


def test_validation_reports_the_version_it_measured(runs):
    """k=1, trainer.val_every=50: version v is validated when the rollout group applies it,
    before generating batch v + 1, so step v + 2's record has it; the last, the final actor
    (version 100, in step 100's record)."""
    validated = {r["step"]: r["val/version"] for r in runs["k1"] if "val/version" in r}
    assert validated == {52: 50, LEARN_STEPS: LEARN_STEPS}
    assert runs["k1"][-1]["val/tiny_copy/reward"] > 0.25


def test_weights_every_second_step(runs):
    """trainer.weight_sync_every=2, k=1: only even versions reach the engines; batch t is
    generated by the newest even version at most t - 1: lags 0, 1, 2, 1, 2, 1."""
    assert [r["staleness/max"] for r in runs["k1n2"]] == [0, 1, 2, 1, 2, 1]


def test_agents_dynamic_sampling_and_ppo_with_tensor_parallel_run_separate(runs):
    """Multi-turn tool calls (a tool that answers after 50-200 ms) on the rollout group,
    their turns taking new weights as they arrive (rollout.partial: a sample's tokens are
    as fresh as its start or fresher); DAPO's extra sampling rounds agreed within the
    rollout group; PPO (critic, reference, GAE) on a TP=2 train group; a rollout TP group to
    a pipeline: every step trains, one step off."""
    for name in ("agent", "dapo", "ppo_tp2", "rollout_tp2_pp2"):
        rows = runs[name]
        assert [r["step"] for r in rows] == [1, 2, 3], name
        assert [r["staleness/max"] for r in rows] == [0, 1, 1], name
        assert all(0 < r["actor/grad_norm"] < float("inf") for r in rows), name
    assert all(r["agent/tool_calls"] > 0 for r in runs["agent"])
    for r in runs["agent"]:
        fresher = r["staleness/token_mean"] < r["staleness/mean"]
        assert fresher == (r["rollout/partial_frac"] > 0), r
    assert all(r["rollout/dynamic_rounds"] >= 1 for r in runs["dapo"])
    assert all(r["critic/value_loss"] >= 0 and "actor/kl" in r for r in runs["ppo_tp2"])


def test_partial_rollouts_take_new_weights_mid_generation(runs):
    """rollout.partial: a generation running when the next version arrives goes on with
    it: its later tokens are one version newer than its first, so a crossed step's tokens
    are fresher on average than its samples' starts, and the bound still holds. Which
    generations an update crosses depends on timing; the engine's side (each token's
    log-prob from the weights that drew it) is tested exactly in test_hf_engine.py."""
    rows = runs["partial"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    crossed = [r for r in rows if r["rollout/partial_frac"] > 0]
    assert crossed, "no update arrived during a generation"
    for r in rows:
        assert r["staleness/max"] <= 1 and r["rollout/partial_frac"] <= 1
        assert 0 < r["actor/grad_norm"] < float("inf")
        fresher = r["staleness/token_mean"] < r["staleness/mean"]
        assert fresher == (r["rollout/partial_frac"] > 0), r["step"]
        # (one update at most per batch on its one engine)
        assert r["rollout/partial_updates"] == (r in crossed), r["step"]


def test_the_train_group_exports_the_final_actor(runs):
    """trainer.export_hf under SEPARATE: the TP=2 train group writes the final actor as a
    Hugging Face checkpoint (within its own group): every tensor of the model it started
    from, trained, and transformers loads it."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_hf import load_tensors

    start, final = (
        load_tensors(runs["task"] / "tiny_llama"),
        load_tensors(runs["ppo_tp2_dir"] / "hf"),
    )
    assert sorted(final) == sorted(start)
    assert any(not torch.equal(final[k], start[k]) for k in start)
    AutoModelForCausalLM.from_pretrained(runs["ppo_tp2_dir"] / "hf")
