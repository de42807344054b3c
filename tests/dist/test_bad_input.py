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
from tests.conftest import ROOT, SHORT_RUN, main_cmd, run_cmd

pytestmark = pytest.mark.dist
SHORT = ["experiment=cpu_tiny_grpo", *SHORT_RUN]
CYCLE = (
    "algo.workflow=[{id:a,role:ROLLOUT,type:MODEL_INFERENCE,deps:[b]},"
    "{id:b,role:REWARD,type:COMPUTE,deps:[a]}]"
)
UNKNOWN_DEP = "algo.workflow=[{id:rollout,role:ROLLOUT,type:MODEL_INFERENCE,deps:[nowhere]}]"


def nan_reward(response, ground_truth, extra_info):
    return float("nan") if len(response) % 2 else 1.0


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
    ("stuck reward", ["reward.fn=tests.dist.test_bad_input.stuck_reward", "reward.timeout_s=1"]),
]


@pytest.mark.parametrize(("case", "overrides"), FINISHING, ids=[c[0] for c in FINISHING])
def test_finishes_with_the_bad_values_counted(task, tmp_path, case, overrides):
    overrides = [o.replace("{task}", str(task)) for o in overrides]
    cmd = main_cmd(2, *SHORT, f"hydra.run.dir={tmp_path}", *overrides)
    start = time.monotonic()
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
    if case == "stuck reward":  # 2 steps x 16 samples, each killed after its 1 s budget
        assert all(r["reward/mean"] == 0.0 for r in rows)
        assert time.monotonic() - start < 200
