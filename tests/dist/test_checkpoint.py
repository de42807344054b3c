"""Checkpoints through the real entrypoint: exact resume, resume on another layout, and a
rank killed mid-run under `torchrun --max-restarts 1`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from distflow_mc.data.tiny import make_task
from tests.conftest import ROOT, TORCHRUN, main_cmd, rank_logs, run_cmd, run_nodes
from tests.tiny_hf import load_tensors

pytestmark = pytest.mark.dist
QUIET = ["experiment=cpu_tiny_grpo", "trainer.progress_bar=false", "parallel.timeout_s=120"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {"DISTFLOW_DATA_DIR": str(make_task(tmp_path_factory.mktemp("task")))}


def run(env: dict, nproc: int, run_dir: Path, *overrides: str) -> None:
    out = run_cmd(
        main_cmd(nproc, *QUIET, f"hydra.run.dir={run_dir}", *overrides),
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "val/"))}


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.cp=2"])
def test_resume_on_one_rank_from_two_ranks(env, tmp_path, layout):
    """A TP=2 or CP=2 checkpoint (and its HF export) resumes on one rank."""
    run(
        env,
        2,
        tmp_path,
        "trainer.total_steps=3",
        "trainer.save_every=3",
        layout,
        "trainer.export_hf=true",
    )
    # scripts/export_hf.py turns the checkpoint into the same HF model, in one process
    script = [
        sys.executable,
        str(ROOT / "scripts" / "export_hf.py"),
        str(tmp_path / "checkpoints"),
        str(tmp_path / "hf_script"),
    ]
    out = run_cmd(script, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    at_end, from_script = load_tensors(tmp_path / "hf"), load_tensors(tmp_path / "hf_script")
    assert sorted(at_end) == sorted(from_script)
    assert all(torch.equal(at_end[k], from_script[k]) for k in at_end)
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf_script")
    run(env, 1, tmp_path, "trainer.total_steps=5", "trainer.resume=AUTO")
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]


def test_killed_rank_restarts_and_resumes(env, tmp_path):
    """SIGKILL one worker mid-run: torchrun restarts the job, it resumes from the latest
    checkpoint, and every step appears exactly once in the metrics."""
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "-m",
        "distflow_mc.main",
        *QUIET,
        f"hydra.run.dir={tmp_path}",
        "trainer.total_steps=30",
        "trainer.save_every=5",
        "trainer.resume=AUTO",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 12):
            assert time.monotonic() < deadline and proc.poll() is None, "run did not get going"
            time.sleep(0.05)
        # the ranks are the agent's own children (their reward workers are theirs)
        workers = [
            p
            for p in psutil.Process(proc.pid).children()
            if "distflow_mc.main" in " ".join(p.cmdline())
        ]
        os.kill(workers[-1].pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 31))
    assert "resumed from" in (tmp_path / "main_rank0.log").read_text()


def test_separate_placement_resumes_after_a_kill_on_either_side(env, tmp_path):
    """rollout.placement=SEPARATE on 3 ranks (0-1 train, 2 generates, one step off): SIGKILL
    the rollout rank mid-run, then, after torchrun's restart, a train rank. Each time the job
    resumes from the train group's latest checkpoint, the rollout group from the loader
    state of the batch that checkpoint trained (batches generated past it are generated
    again), and every step appears exactly once."""
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc-per-node=3",
        "--max-restarts=2",
        "-m",
        "distflow_mc.main",
        *QUIET,
        f"hydra.run.dir={tmp_path}",
        "placement=separate",
        "rollout.ranks=1",
        "trainer.val_every=0",
        "trainer.total_steps=30",
        "trainer.save_every=5",
        "trainer.resume=AUTO",
    ]
    out = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, **out)
    metrics = tmp_path / "metrics.jsonl"
    try:
        for rank, rows_before in ((2, 12), (1, 22)):
            deadline = time.monotonic() + 240
            while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows_before):
                assert time.monotonic() < deadline and proc.poll() is None, "run did not go on"
                time.sleep(0.05)
            (worker,) = [
                p
                for p in psutil.Process(proc.pid).children()
                if "distflow_mc.main" in " ".join(p.cmdline())
                and p.environ().get("RANK") == str(rank)
            ]
            os.kill(worker.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    records = rows(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert (tmp_path / "main_rank0.log").read_text().count("resumed from") == 2
    # a resumed run generates its first batch with the checkpoint's own weights
    lags = [r["staleness/max"] for r in records]
    assert lags[0] == 0 and lags.count(0) == 3 and set(lags) == {0, 1}


def test_half_written_checkpoints_are_ignored(tmp_path):
    from distflow_mc.checkpoint import complete_steps

    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "trainer_state.json").write_text("{}")
    (tmp_path / "step_00000008").mkdir()  # interrupted before its state was written
    (tmp_path / ".step_00000012.tmp").mkdir()  # interrupted before the rename
    assert complete_steps(tmp_path) == [4]
    (tmp_path / "latest").write_text(json.dumps({"step": 8}))  # points at a broken one
    assert complete_steps(tmp_path) == [4]
    assert complete_steps(tmp_path / "missing") == []


def test_resume_continues_exactly_from_the_newest_intact_checkpoint(env, tmp_path):
    """A truncated shard in the newest checkpoint: resume warns naming it and goes on from
    the one before, with the metrics of an uninterrupted run (every random draw derives
    from seed and step), every step once; when none is intact, the error names the
    directory."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(env, 2, straight, "trainer.total_steps=6")
    run(env, 2, resumed, "trainer.total_steps=4", "trainer.save_every=2")
    newest = resumed / "checkpoints" / "step_00000004"
    shard = max(newest.glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run(env, 2, resumed, "trainer.total_steps=6", "trainer.resume=AUTO")
    log = (resumed / "main_rank0.log").read_text()
    assert f"checkpoint {newest} is damaged ({shard.name} has" in log
    assert "resumed from" in log and "step_00000002" in log
    assert [comparable(r) for r in rows(resumed)] == [comparable(r) for r in rows(straight)]
    for step_dir in (resumed / "checkpoints").glob("step_*"):
        for f in step_dir.glob("*.distcp"):
            f.write_bytes(b"")
    cmd = main_cmd(
        2, *QUIET, f"hydra.run.dir={resumed}", "trainer.total_steps=7", "trainer.resume=AUTO"
    )
    out = run_cmd(cmd, cwd=ROOT, timeout=300, env=env)
    assert out.returncode != 0
    assert f"no intact checkpoint in {resumed / 'checkpoints'}" in out.stdout + out.stderr


def same_reward(response, ground_truth, extra_info) -> float:
    return 1.0  # every group's rewards alike: dynamic sampling keeps none


def test_distributed_optimizer_saves_before_its_first_update(env, tmp_path):
    """Dynamic sampling keeps no group (every reward alike), so no step updates the model:
    the distributed optimizer's checkpoint (Adam before its first step) still saves, and
    resumes."""
    empty = [
        "trainer.actor_optim.distributed_optimizer=true",
        "reward.fn=tests.dist.test_checkpoint.same_reward",
        "algo.dynamic_sampling=true",
        "algo.dynamic_sampling_max_rounds=1",
        "data.max_empty_steps=3",
    ]
    run(env, 2, tmp_path, *empty, "trainer.total_steps=1", "trainer.save_every=1")
    run(env, 2, tmp_path, *empty, "trainer.total_steps=2", "trainer.resume=AUTO")
    assert [(r["step"], r["actor/empty_skipped_steps"]) for r in rows(tmp_path)] == [
        (1, 1.0),
        (2, 1.0),
    ]


def test_distributed_optimizer_resumes_exactly_and_on_fewer_ranks(env, tmp_path):
    """With the distributed optimizer (its Adam state sharded over DP): a resumed run has
    the metrics of an uninterrupted one (the step after the resume shows Adam's moments
    and step count, its bias correction); the checkpoint also resumes on one rank (DP 2 ->
    1); a layout or optimizer its state cannot load into is refused by name."""
    opt = "trainer.actor_optim.distributed_optimizer=true"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(env, 2, straight, opt, "trainer.total_steps=4")
    run(env, 2, resumed, opt, "trainer.total_steps=2", "trainer.save_every=2")
    one = tmp_path / "one"
    shutil.copytree(resumed / "checkpoints", one / "checkpoints")
    run(env, 2, resumed, opt, "trainer.total_steps=4", "trainer.resume=AUTO")
    assert [comparable(r) for r in rows(resumed)] == [comparable(r) for r in rows(straight)]
    run(env, 1, one, opt, "trainer.total_steps=3", "trainer.resume=AUTO")
    assert [r["step"] for r in rows(one)] == [3]
    for nproc, overrides, says in [
        (1, [], "saved with trainer.actor_optim.distributed_optimizer=true"),
        (2, [opt, "parallel.tp=2"], "it was saved at parallel.tp=1 (now 2)"),
    ]:
        args = [*QUIET, f"hydra.run.dir={one}", "trainer.total_steps=5", "trainer.resume=AUTO"]
        assert all(code != 0 for code, _ in run_nodes(nproc, [*args, *overrides], ROOT, 300, env))
        assert all(says in log for log in rank_logs(one, nproc)), says  # each rank's own
