"""The real entrypoint under torchrun (2 ranks, gloo) and plain python. Each launch has a
hard subprocess timeout and short collective timeouts, so a bug fails instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, main_cmd, rank_logs, run_cmd, run_nodes

pytestmark = pytest.mark.dist
FAST = ["parallel.timeout_s=60"]


def test_plain_python_dry_run(workdir: Path):
    out = run_cmd(main_cmd(1, "trainer.dry_run=true", f"hydra.run.dir={workdir}"), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "1 rank(s) agree on plan" in out.stdout
    assert out.stdout.count("stage 0:") == 1
    assert (workdir / ".hydra" / "config.yaml").exists()
    assert (workdir / "main_rank0.log").exists()


def test_torchrun_ppo_dry_run_prints_plan_once(workdir: Path):
    cmd = main_cmd(2, "algo=ppo", "parallel.pp=2", "trainer.dry_run=true", *FAST)
    out = run_cmd(cmd, cwd=workdir, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "algo=ppo, 6 nodes in 5 stages, 2 rank(s) agree on plan" in out.stdout
    assert "train pipeline stage 0 receives input_ids (and the lengths" in out.stdout
    assert "train pipeline stage 1 receives all it carries" in out.stdout
    assert "dropped ref_log_prob: nothing reads its ref_logprobs (algo.kl_coef=0" in out.stdout
    assert out.stdout.count("stage 0:") == 1
    assert "critic_train" in out.stdout
    assert "[rank1]" not in out.stdout
    (run_dir,) = (workdir / "outputs").iterdir()
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["main_rank0.log", "main_rank1.log"]
    assert (run_dir / ".hydra").is_dir()


def test_separate_placement_dry_run_says_which_ranks_do_what(workdir: Path):
    """3 ranks, rollout.placement=SEPARATE with one rollout rank: every rank plans alike
    and agrees; the plan puts training on ranks 0-1 and rollout on rank 2."""
    separate = ["rollout.placement=SEPARATE", "rollout.ranks=1", "data.batch_size=4"]
    cmd = main_cmd(3, *separate, "trainer.dry_run=true", *FAST)
    out = run_cmd(cmd, cwd=workdir, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 rank(s) agree on plan" in out.stdout
    assert "layout rollout: DP=1 x TP=1 over 1 rank(s) (ranks 2-2)" in out.stdout
    assert "layout train: DP=2 x TP=1 x PP=1 over 2 rank(s) (ranks 0-1)" in out.stdout
    assert "(all-to-all in: input_ids, response_mask, reward, rollout_logprobs)" in out.stdout


def test_differing_config_fails_on_every_rank(workdir: Path):
    """One rank's resolved config differs (an env-derived value): both ranks raise, each in
    its own log file, with the message naming the setting, well inside the timeout."""
    args = [
        "trainer.dry_run=true",
        "trainer.seed=${oc.env:RANK}",
        *FAST,
        f"hydra.run.dir={workdir}",
    ]
    for code, _ in run_nodes(2, args, cwd=workdir):
        assert code != 0
    for log in rank_logs(workdir, 2):
        assert "ranks disagree on the plan/config fingerprint" in log, log
        assert "config.trainer.seed (rank 0: 0, rank 1: 1)" in log


def test_wrong_world_size_fails_on_every_rank_before_collectives(workdir: Path):
    args = ["parallel.tp=3", *FAST, f"hydra.run.dir={workdir}"]
    for code, _ in run_nodes(2, args, cwd=workdir):
        assert code != 0
    for log in rank_logs(workdir, 2):
        assert "world size 2 is not divisible by parallel.tp" in log, log


def test_unknown_key_names_it_through_the_entrypoint(workdir: Path):
    out = run_cmd(main_cmd(1, "trainer.dryrun=true"), cwd=workdir)
    assert out.returncode == 1
    assert "dryrun" in out.stderr


def test_multirun_under_torchrun(workdir: Path):
    """Hydra multirun (-m) with 2 jobs on 2 ranks: jobs run in the same order on every rank
    (each job's fingerprint check would fail otherwise), each in its own directory."""
    out = run_cmd(
        main_cmd(2, "-m", "algo=grpo,ppo", "trainer.dry_run=true", *FAST),
        cwd=workdir,
        timeout=240,
        env={"DISTFLOW_RUN_ID": "sweep"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "algo=grpo, 4 nodes in 4 stages, 2 rank(s) agree" in out.stdout
    assert "algo=ppo, 6 nodes in 5 stages, 2 rank(s) agree" in out.stdout
    jobs = sorted(p.name for p in (workdir / "multirun" / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_sglang_without_gpu_fails_on_every_rank(workdir: Path):
    out = run_cmd(main_cmd(2, "rollout=sglang", *FAST), cwd=workdir, timeout=180)
    assert out.returncode != 0
    assert "rollout.engine=SGLANG needs" in out.stdout + out.stderr
