"""Short real training runs through the real entrypoint (torchrun, 2 ranks, gloo) on the
embedded task: they complete, write metrics, and learn.

Thresholds: with the shipped settings the reward's mean over the first 10 steps is
0.049 (GRPO, 150 steps) / 0.047 (PPO, 130 steps) and over the last 30 steps 0.453 /
0.468; a random policy scores ~0.02 and "any digit" alone 0.2. Runs are
deterministic (seeded sampling, fixed data order, CPU kernels): the same seed gives the
same curve bit for bit, so the margins below guard against numerics differing on another
CPU, not against luck."""

from __future__ import annotations

from pathlib import Path

import pytest

from distflow_mc.data.tiny import make_task
from tests.conftest import run_sweep

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory) -> dict[str, list[dict]]:
    """Every run, one sweep in one launch of 2 ranks (each job as a user's sweep runs it)."""
    from transformers import AutoConfig

    from tests.tiny_hf import make_tiny_model

    config = AutoConfig.from_pretrained(task / "tiny_llama")
    ids = {k: getattr(config, k) for k in ("vocab_size", "bos_token_id", "eos_token_id")}
    moe = make_tiny_model("qwen3_moe", task / "moe", pad_token_id=config.pad_token_id, **ids)
    cases = {
        "grpo": ["experiment=cpu_tiny_grpo", "trainer.total_steps=150"],
        "ppo": ["experiment=cpu_tiny_ppo", "trainer.total_steps=130"],
        "dapo_gspo": [
            "experiment=cpu_tiny_grpo",
            "trainer.total_steps=6",
            "algo.dynamic_sampling=true",
            "algo.overlong_buffer=2",
            "algo.policy_loss=GSPO",
            "algo.loss_agg=SEQ_MEAN_TOKEN_MEAN",
            "algo.clip_high=0.28",
            "trainer.val_every=0",
        ],
        "agent": [
            "experiment=cpu_tiny_agent",
            "trainer.total_steps=30",
            "parallel.tp=2",
            "trainer.val_every=15",
        ],
        "vlm": [
            "experiment=cpu_tiny_vlm",
            "trainer.total_steps=90",
            "parallel.tp=2",
            "trainer.val_every=45",
        ],
        "moe": [
            "experiment=cpu_tiny_grpo",
            "trainer.total_steps=40",
            f"model.path={moe}",
            f"data.tokenizer={task / 'tiny_llama'}",
            "parallel.ep=2",
            "trainer.val_every=0",
        ],
    }
    common = ["parallel.timeout_s=120", "trainer.progress_bar=false"]
    run_dir = tmp_path_factory.mktemp("runs")
    env = {"DISTFLOW_DATA_DIR": str(task)}
    out = run_sweep(2, {k: [*v, *common] for k, v in cases.items()}, run_dir, env, timeout=900)
    for name, rows in out.items():
        steps = int(next(o for o in cases[name] if o.startswith("trainer.total_steps="))[20:])
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), name
    out["dapo_gspo_dir"] = run_dir / str(list(cases).index("dapo_gspo"))
    return out


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_grpo_learns(runs):
    rows = runs["grpo"]
    first, last = mean(rows[:10], "reward/mean"), mean(rows[-30:], "reward/mean")
    assert last > 0.35 and last > first + 0.25, (first, last)
    for key in (
        "actor/entropy",
        "actor/kl",
        "actor/grad_norm",
        "actor/clip_frac",
        "actor/lr",
        "response/length_mean",
        "reward/std",
        "time/step",
        "time/rollout",
        "throughput/generated_tokens_per_s",
        "throughput/total_tokens_per_s",
    ):
        assert key in rows[-1], key
    # engine and actor compute the same log-probs: the weight sync is exact
    assert max(r["rollout/logprob_gap_mean"] for r in rows) < 1e-4
    validated = [r["step"] for r in rows if "val/tiny_copy/reward" in r]
    assert validated == [50, 100, 150]
    assert rows[-1]["val/tiny_copy/reward"] > rows[49]["val/tiny_copy/reward"] - 0.1


def test_ppo_learns(runs):
    rows = runs["ppo"]
    first, last = mean(rows[:10], "reward/mean"), mean(rows[-30:], "reward/mean")
    assert last > 0.35 and last > first + 0.25, (first, last)
    assert "critic/value_loss" in rows[-1] and "critic/grad_norm" in rows[-1]


def test_dapo_extras_and_gspo_run(runs):
    """DAPO dynamic sampling and overlong penalty with the GSPO loss and clip-higher: a
    few steps complete with their metrics."""
    rows = runs["dapo_gspo"]
    assert any((runs["dapo_gspo_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    assert all(1 <= r["rollout/dynamic_rounds"] <= 4 for r in rows)
    assert all(r["rollout/groups"] <= 8 for r in rows)


def test_agent_learns_to_call_its_tool(runs):
    """The agent preset with tool calls, trajectories moved from the rollout layout (DP=2)
    to the training layout (TP=2): the tool-call rate and the reward rise, and the engine's
    log-probs of multi-turn trajectories equal the actor's (token in, token out)."""
    rows = runs["agent"]
    calls = mean(rows[:5], "agent/tool_call_rate"), mean(rows[-5:], "agent/tool_call_rate")
    assert calls[1] > calls[0] + 0.3, calls
    first, last = mean(rows[:5], "reward/mean"), mean(rows[-5:], "reward/mean")
    assert last > first + 0.15, (first, last)
    assert mean(rows[-5:], "agent/turns") > 1.5
    for key in ("agent/tool_errors", "agent/tool_timeouts", "agent/truncated_frac"):
        assert key in rows[-1], key
    assert max(r["rollout/logprob_gap_mean"] for r in rows) < 1e-4
    assert [r["step"] for r in rows if "val/tiny_lookup/reward" in r] == [15, 30]


def test_moe_with_expert_parallel_learns(runs):
    """A tiny Qwen3-MoE (4 experts, top-2) with its experts split over EP=2 learns the copy
    task: the reward over steps 31-40 is 0.279 against 0.055 over the first 10 (seeded,
    deterministic on one CPU type), and the router statistics are logged."""
    rows = runs["moe"]
    first, last = mean(rows[:10], "reward/mean"), mean(rows[-10:], "reward/mean")
    assert last > first + 0.15, (first, last)
    assert all(r["actor/router_load_max_over_mean"] >= 1.0 for r in rows)
    assert max(r["rollout/logprob_gap_mean"] for r in rows) < 1e-4


def test_vision_language_model_learns_to_read_its_images(runs):
    """The embedded vision-language task (a tiny Qwen2.5-VL, an image of one of ten
    colours, answer its digit) trained at TP=2, the images moved from the rollout layout
    (DP=2) with their samples: the reward rises from 0.05 over the first 10 steps to 0.51
    over steps 81-90 (seeded). Answering any digit scores 0.2 and a right guess 1.0 in ten,
    so without reading the image a policy stays under 0.28: the model reads the colours.
    The engine's log-probs (transformers' generation with the images) equal the actor's."""
    rows = runs["vlm"]
    first, last = mean(rows[:10], "reward/mean"), mean(rows[-10:], "reward/mean")
    assert last > 0.35 and last > first + 0.25, (first, last)
    assert max(r["rollout/logprob_gap_max"] for r in rows) < 1e-4
    assert [r["step"] for r in rows if "val/tiny_copy/reward" in r] == [45, 90]
