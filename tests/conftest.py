"""Shared helpers: compose the shipped config with Hydra's own compose API, and run the
real entrypoint (python -m / torchrun) in subprocesses with hard timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from distflow_mc.config import register_resolvers, register_schemas

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# A two-step run of the embedded task, small enough for a few seconds per launch.
SHORT_RUN = [
    "trainer.total_steps=2",
    "trainer.val_every=0",
    "trainer.progress_bar=false",
    "parallel.timeout_s=60",
    "data.batch_size=4",
    "rollout.n=4",
]

register_schemas()
register_resolvers()


def compose_config(overrides: list[str] = (), config_dir: Path = CONF_DIR) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("config", overrides=list(overrides))


def run_cmd(
    args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run with a hard timeout; a hang fails the test instead of the CI job."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def main_cmd(nproc: int, *overrides: str) -> list[str]:
    """The real entrypoint: plain python for one rank, torchrun otherwise."""
    if nproc == 1:
        return [sys.executable, "-m", "distflow_mc.main", *overrides]
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "distflow_mc.main", *overrides]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
