"""Bad input through the real CLI on 2 ranks: every case ends inside its timeout, either
failing on every rank with a message that names the setting, file, row or data source, or
finishing with the bad values counted and the weights unharmed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distflow_mc.data.tiny import make_task
from tests.conftest import ROOT, SHORT_RUN, main_cmd, rank_logs, run_cmd, run_nodes

pytestmark = pytest.mark.dist
SHORT = ["experiment=cpu_tiny_grpo", *SHORT_RUN]
CYCLE = (
    "algo.workflow=[{id:a,role:ROLLOUT,type:MODEL_INFERENCE,deps:[b]},"
    "{id:b,role:REWARD,type:COMPUTE,deps:[a]}]"
)
UNKNOWN_DEP = "algo.workflow=[{id:rollout,role:ROLLOUT,type:MODEL_INFERENCE,deps:[nowhere]}]"


def nan_reward(response, ground_truth, extra_info):
    return float("nan") if len(response) % 2 else 1.0


def same_reward(response, ground_truth, extra_info):
    return 1.0  # every group's samples alike: dynamic sampling keeps none


def stuck_reward(response, ground_truth, extra_info):
    time.sleep(3600)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = make_task(tmp_path_factory.mktemp("task"))
    rows = pq.read_table(root / "tiny_task" / "train.parquet").to_pylist()[:64]
    with (root / "mystery.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, "data_source": "mystery"}) + "\n")
    with (root / "bad_rows.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            line = json.dumps(row if i % 4 else {**row, "reward_model": {}})
            f.write(line + "\n" if i != 5 else "{not json\n")
    rows = pq.read_table(root / "tiny_task" / "train.parquet").to_pylist()[:256]
    for name, usable in (("all_long", ()), ("gappy", range(0, 256, 16))):
        with (root / f"{name}.jsonl").open("w") as f:
            for i, row in enumerate(rows):
                long = [{**m, "content": "x " * 80 + m["content"]} for m in row["prompt"]]
                f.write(json.dumps(row if i in usable else {**row, "prompt": long}) + "\n")
    return root


# (case, overrides, expected message or None when the run must finish, messages per rank)
FAILING = [
    ("unknown key", ["trainer.dryrun=true"], "dryrun"),
    ("wrong type", ["trainer.total_steps=many"], "trainer.total_steps"),
    ("out of range", ["algo.ppo_epochs=0"], "algo.ppo_epochs: must be >= 1"),
    ("DAG cycle", [CYCLE], "cycle"),
    ("unknown dependency", [UNKNOWN_DEP], "unknown"),
    ("impossible layout", ["parallel.tp=3"], "world size 2 is not divisible by parallel.tp"),
    ("missing model", ["model.path=/nonexistent/model"], "model.path=/nonexistent/model: no"),
    ("missing data", ["data.train_files=[/nonexistent/train.parquet]"], "data file not found"),
    ("unknown data source", ["data.train_files=[{task}/mystery.jsonl]"], "data_source ['mystery']"),
    (
        "malformed row, ERROR",
        [
            "data.train_files=[{task}/bad_rows.jsonl]",
            "data.on_malformed=ERROR",
            "data.shuffle=false",
        ],
        "bad_rows.jsonl row 0: 'reward_model.ground_truth' is missing",
    ),
    (
        "overlong prompt, ERROR",
        ["data.max_prompt_length=3", "data.on_overlong=ERROR"],
        "tokens > data.max_prompt_length=3",
    ),
    (
        "no rank left to train",
        ["placement=separate", "rollout.ranks=2"],
        "rollout.ranks=2 leaves no rank to train in a world of 2",
    ),
    (
        "a file with no usable row",
        ["data.train_files=[{task}/all_long.jsonl]"],
        "all_long.jsonl has no usable row among 32 spread over its 256 rows: 32 longer than"
        " data.max_prompt_length=64 tokens, 0 malformed",
    ),
    (
        "longer than the model's positions",
        ["rollout.max_new_tokens=500"],
        "data.max_prompt_length + rollout.max_new_tokens = 64 + 500 = 564 tokens exceeds"
        " max_position_embeddings=512",
    ),
    (
        "dynamic sampling keeps no group",
        [
            "reward.fn=tests.dist.test_bad_input.same_reward",
            "algo.dynamic_sampling=true",
            "algo.dynamic_sampling_max_rounds=1",
            "data.max_empty_steps=1",
        ],
        "1 step in a row with no group kept on any rank (algo.dynamic_sampling drops groups"
        " whose rewards are all equal) (data.max_empty_steps=1); nothing is learning: change"
        " algo.dynamic_sampling_max_rounds, rollout.n or the reward",
    ),
]


@pytest.mark.parametrize(("case", "overrides", "message"), FAILING, ids=[c[0] for c in FAILING])
def test_refused_with_a_message_naming_it(task, tmp_path, case, overrides, message):
    overrides = [o.replace("{task}", str(task)) for o in overrides]
    cmd = main_cmd(2, *SHORT, f"hydra.run.dir={tmp_path}", *overrides)
    out = run_cmd(cmd, cwd=ROOT, timeout=180, env={"DISTFLOW_DATA_DIR": str(task)})
    assert out.returncode != 0, case
    assert message in out.stdout + out.stderr, (case, (out.stdout + out.stderr)[-3000:])


FINISHING = [
    ("malformed rows skipped", ["data.train_files=[{task}/bad_rows.jsonl]", "data.shuffle=false"]),
    ("NaN rewards", ["reward.fn=tests.dist.test_bad_input.nan_reward"]),
]


@pytest.mark.parametrize(("case", "overrides"), FINISHING, ids=[c[0] for c in FINISHING])
def test_finishes_with_the_bad_values_counted(task, tmp_path, case, overrides):
    overrides = [o.replace("{task}", str(task)) for o in overrides]
    cmd = main_cmd(2, *SHORT, f"hydra.run.dir={tmp_path}", *overrides)
    out = run_cmd(cmd, cwd=ROOT, timeout=240, env={"DISTFLOW_DATA_DIR": str(task)})
    assert out.returncode == 0, (case, out.stdout[-2000:] + out.stderr[-4000:])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(
        math.isfinite(r["actor/grad_norm"]) and math.isfinite(r["reward/mean"]) for r in rows
    )
    if case == "malformed rows skipped":
        assert all(r["data/malformed_rows"] > 0 for r in rows)
    else:
        assert all(r["reward/errors"] > 0 for r in rows)


def test_a_hung_scorer_costs_one_budget_per_step_then_stops(task, tmp_path):
    """Every scorer call hangs: each step's stuck samples spend their budgets together (8
    samples per rank on 4 workers: 2 budgets of 1 s, not 8 budgets plus a new pool each), the
    step goes on with error scores, and after reward.max_failing_steps=2 such steps every
    rank stops, naming reward.fn in its own log."""
    run = [*SHORT, "trainer.total_steps=3", f"hydra.run.dir={tmp_path}"]
    stuck = ["reward.fn=tests.dist.test_bad_input.stuck_reward", "reward.timeout_s=1"]
    env = {"DISTFLOW_DATA_DIR": str(task)}
    for code, _ in run_nodes(2, [*run, *stuck, "reward.max_failing_steps=2"], ROOT, 240, env):
        assert code != 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["reward/timeouts"], r["reward/samples"], r["reward/mean"]) == (16, 16, 0.0)
        assert r["time/reward"] < 6  # ceil(8 / 4) = 2 budgets (one each: 8), room for load
    for log in rank_logs(tmp_path, 2):
        assert "8 of 8 rewards scored reward.error_score=0.0: 8 timed out" in log
        assert (
            "every reward of the last 2 steps scored reward.error_score=0.0 "
            "(reward.max_failing_steps=2; this step: 16 of 16 timed out after"
            " reward.timeout_s=1.0, 0 failed): reward.fn=tests.dist.test_bad_input.stuck_reward"
            " is not answering"
        ) in log


@pytest.mark.parametrize(
    ("ranks", "placement"),
    [(2, []), (3, ["placement=separate", "rollout.ranks=1", "trainer.max_staleness=2"])],
    ids=["colocated", "separate"],
)
def test_steps_without_a_usable_sample_skip_the_update_then_stop(task, tmp_path, ranks, placement):
    """Rows are read in order and only every 16th prompt is short enough: step 1 has one
    group, steps 2 and 3 none on any rank. Step 2 warns with the counts, takes no optimizer
    step and logs no NaN; at the second empty step in a row (data.max_empty_steps=2) every
    rank stops, naming data.max_prompt_length in its own log. Under SEPARATE (ranks 0-1
    train, rank 2 generates two steps ahead) both groups stop at the same step: the rollout
    rank, which decides first, and the train ranks, when they reach it."""
    data = [f"data.train_files=[{task}/gappy.jsonl]", "data.shuffle=false"]
    run = [*SHORT, *data, "trainer.total_steps=4", "data.max_empty_steps=2", *placement]
    env = {"DISTFLOW_DATA_DIR": str(task)}
    for code, _ in run_nodes(ranks, [*run, f"hydra.run.dir={tmp_path}"], ROOT, 240, env):
        assert code != 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[0]["rollout/samples"] == 4 and rows[0]["actor/empty_skipped_steps"] == 0
    assert rows[0]["data/skipped_prompts"] == 3 and "actor/grad_norm" in rows[0]
    for r in rows[1:]:
        assert r["rollout/samples"] == 0 and r["data/overlong_prompts"] == 4
        assert r["actor/empty_skipped_steps"] == 1 and "actor/grad_norm" not in r
        assert "reward/mean" not in r and "actor/pg_loss" not in r
    logs = rank_logs(tmp_path, ranks)
    assert "step 1 skipped 3 prompts, 3 longer than data.max_prompt_length=64" in logs[0]
    assert "step 2: no usable sample on any rank: 4 prompts, 4 longer" in logs[0]
    assert "no update this step (1 of data.max_empty_steps=2 in a row)" in logs[0]
    for log in logs:
        assert "2 steps in a row with no usable sample on any rank" in log
        assert "change data.max_prompt_length or data.train_files" in log
