"""Launch scripts: they parse, and the Slurm template's dry run renders the torchrun command
it would run on every node."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = [
    ROOT / "launch" / "slurm" / "train.sbatch",
    ROOT / "launch" / "local.sh",
    ROOT / "scripts" / "gpu_check.sh",
    ROOT / "scripts" / "fetch_gpu_wheels.sh",
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_sbatch_dry_run_renders_the_command():
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SLURM_NNODES": "4",
        "SLURM_JOB_ID": "4242",
        "GPUS_PER_NODE": "8",
        "RDZV_PORT": "29600",
    }
    out = subprocess.run(
        ["bash", str(SCRIPTS[0]), "algo=ppo", "trainer.actor_optim.lr=1e-6"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    argv = shlex.split(out)
    assert argv[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = argv[argv.index("torchrun") :]
    assert torchrun[torchrun.index("--nnodes") + 1] == "4"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("--rdzv-backend") + 1] == "c10d"
    assert torchrun[torchrun.index("--rdzv-id") + 1] == "4242"
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1].endswith(":29600")
    assert torchrun[-5:] == [
        "-m",
        "distflow_mc.main",
        "trainer.resume=AUTO",
        "algo=ppo",
        "trainer.actor_optim.lr=1e-6",
    ]


def test_gpu_check_calls_its_scripts_with_arguments_they_take():
    """scripts/gpu_check.sh runs only on a lent GPU: each benchmark it calls parses the
    arguments it is given (argparse checks every value before `--help` exits)."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r'scripts/(\w+\.py)" ([^)]*)\)', text)
    assert {name for name, _ in calls} == {"bench_model.py", "bench_long_context.py"}
    for name, args in calls:
        cmd = [sys.executable, str(ROOT / "scripts" / name), *shlex.split(args), "--help"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "scripts")
        assert proc.returncode == 0, (name, args, proc.stderr[-2000:])


def test_sweep_configs_draws_settings_the_schema_knows():
    """scripts/sweep_configs.py: every draw composes (no unknown key, no wrong type), the
    same seed draws the same, and some are accepted for 2 ranks (the script draws again
    until one is)."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep_configs.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    draws = [sweep.draw(random.Random(seed)) for seed in range(24)]
    assert draws[:3] == [sweep.draw(random.Random(seed)) for seed in range(3)]
    taken = [sweep.accepted(d, 2) for d in draws]  # (composes each: raises on a bad key)
    assert sum(taken) >= 2, taken
