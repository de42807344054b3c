"""rollout.stream through the real entrypoint (2 gloo ranks under torchrun: rank 0 trains,
rank 1 generates), on the embedded agent task with a tool whose key-7 answer takes 1.5 s
(several steps' time; the untrained model calls it in about a third of the groups) and an
advantage node that writes down which groups each step trains (stream_probe.py). One
launch runs:

- WAIT: every prompt of the epoch is trained exactly once, all of a group's samples
  together, none more than trainer.max_staleness versions old.
- DROP: no group twice; the prompts not trained are at most the groups counted dropped.
- A run stopped after 3 steps (a checkpoint with groups still in flight) and resumed: the
  two together train every prompt of the epoch exactly once.
- Single turns (the embedded GRPO task, no tools) streamed in pieces of 2 tokens
  (rollout.stream_chunk) with rollout.partial: every prompt of the epoch trained exactly
  once, a step's groups generated over several engine calls.

Which groups a step takes, defers, waits for and drops, call by call:
tests/unit/test_agent_stream.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distflow_mc.data.tiny import make_agent_dataset, make_dataset, make_task
from tests.conftest import compose_config, run_sweep

pytestmark = pytest.mark.dist

ROWS, BATCH, K = 24, 4, 2  # an epoch: 6 steps' prompts, drawn by the 5th (one share ahead)


def trained(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "trained_rank0.jsonl").read_text().splitlines()]


def test_stream_defers_drops_and_resumes(tmp_path):
    task = make_task(tmp_path / "task")
    data = tmp_path / "agent.parquet"
    make_agent_dataset(data, ROWS, seed=0)
    single_data = tmp_path / "single.parquet"
    make_dataset(single_data, ROWS, seed=0)
    workflow = OmegaConf.to_container(compose_config().algo.workflow, enum_to_str=True)
    (node,) = [n for n in workflow if n["id"] == "advantage"]
    node["fn"] = "tests.dist.stream_probe.advantage"
    shared = [
        "data.val_files=[]",
        f"data.batch_size={BATCH}",
        "rollout.n=4",
        f"algo.workflow={json.dumps(workflow)}",
        "placement=separate",
        "rollout.ranks=1",
        f"trainer.max_staleness={K}",
        "rollout.stream=true",
        "trainer.val_every=0",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "parallel.timeout_s=120",
    ]
    common = [
        "experiment=cpu_tiny_agent",
        f"model.path={task / 'tiny_agent_llama'}",
        f"data.train_files=[{data}]",
        "rollout.agent.tools=[tests.dist.stream_probe.StallLookup]",
        *shared,
    ]
    single = [
        "experiment=cpu_tiny_grpo",
        f"model.path={task / 'tiny_llama'}",
        f"data.train_files=[{single_data}]",
        "rollout.max_new_tokens=8",
        "rollout.stream_chunk=2",
        "rollout.partial=true",  # weights arriving during a step go in between pieces
        *shared,
    ]
    ckpt = f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"
    cases = {
        "single": [*single, "trainer.total_steps=7"],
        "wait": [*common, "trainer.total_steps=7"],
        "drop": [*common, "trainer.total_steps=7", "trainer.on_stale=DROP"],
        "first": [*common, "trainer.total_steps=3", "trainer.save_every=3", ckpt],
        "resumed": [*common, "trainer.total_steps=7", "trainer.resume=AUTO", ckpt],
    }
    runs = run_sweep(2, cases, tmp_path / "sweep")
    jobs = {name: tmp_path / "sweep" / str(i) for i, name in enumerate(cases)}

    def counts(*names: str) -> Counter:
        return Counter(g for n in names for r in trained(jobs[n]) for g in r["group"])

    epoch = set(range(ROWS))  # uid = epoch * rows + row: epoch 0's are the rows
    n = 4  # samples per group
    for name in ("single", "wait", "drop"):
        records = runs[name]
        assert max(r["staleness/max"] for r in records) <= K, name
        for r in trained(jobs[name]):  # the probe's versions agree with the metrics
            assert all(r["step"] - v <= K for v in r["version"])
        got = counts(name)
        assert all(c == n for c in got.values()), (name, got)  # a group once, all its samples
    assert epoch <= set(counts("single"))
    assert max(r["stream/engine_calls"] for r in runs["single"]) >= 4  # 8 tokens in pieces of 2
    assert all("rollout/partial_updates" in r for r in runs["single"])
    wait = counts("wait")
    assert epoch <= set(wait), epoch - set(wait)
    assert sum(r["stream/deferred_groups"] for r in runs["wait"]) > 0
    assert sum(r["stream/dropped_groups"] for r in runs["wait"]) == 0
    drop = counts("drop")
    dropped = sum(r["stream/dropped_groups"] for r in runs["drop"])
    assert dropped >= 1 and len(epoch - set(drop)) <= dropped  # the rest: trained
    both = counts("first", "resumed")
    assert [r["step"] for r in runs["resumed"]] == [4, 5, 6, 7]
    assert epoch <= set(both) and all(c == n for c in both.values()), both
