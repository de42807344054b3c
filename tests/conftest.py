"""Shared helpers: compose the shipped config with Hydra's own compose API, and run the
real entrypoint (python -m / torchrun) in subprocesses with hard timeouts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import settings
from omegaconf import DictConfig, OmegaConf

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
# property tests draw the same examples on every run (a CI run reproduces a local one,
# and no run fails on a draw another did not make); no example database between runs
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


def compose_config(overrides: list[str] = (), config_dir: Path = CONF_DIR) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("config", overrides=list(overrides))


def run_cmd(
    args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run with a hard timeout; a hang fails the test instead of the CI job."""
    return subprocess.run(
        args, cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout
    )


def run_worker(world: int, worker: Path, out: Path, *args: str, timeout: float = 180) -> list[dict]:
    """A test worker script on `world` ranks under torchrun, told to write its results to
    `out`; each rank's rank{r}.json, read back."""
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={world}", str(worker), *args]
    proc = run_cmd([*cmd, "--out", str(out)], cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def clean_env(env: dict | None) -> dict:
    """This process's environment without a torchrun's rank variables, plus `env`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return full_env


def run_nodes(
    nodes: int, args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None
) -> list[tuple[int, str]]:
    """One torchrun agent per rank (a 'node' of one rank each), meeting by c10d rendezvous,
    running `python -m distflow_mc.main *args`: (exit code, output) per agent. Each rank runs
    to its own end, whereas one torchrun with several ranks ends the others as soon as one
    fails, so what each rank does on its own can be asserted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = [
        TORCHRUN,
        f"--nnodes={nodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=nodes",
        "-m",
        "distflow_mc.main",
        *args,
    ]
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [subprocess.Popen(agent, cwd=cwd, env=clean_env(env), **out) for _ in range(nodes)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def rank_logs(run_dir: Path, ranks: int) -> list[str]:
    """Each rank's own log file of a run (what it logged, whatever the console kept)."""
    return [(run_dir / f"main_rank{r}.log").read_text() for r in range(ranks)]


def run_sweep(
    nproc: int,
    cases: dict[str, list[str]],
    run_dir: Path,
    env: dict | None = None,
    timeout: float = 600,
) -> dict[str, list[dict]]:
    """Several runs in one launch (a process start costs seconds, a run of a few steps less):
    Hydra multirun over a `case` config group written from `cases` (name -> overrides; one
    of a config group, `experiment=` or `placement=`, selects that option), every job in
    the same processes, one after the other, as any user sweep runs. Returns each case's
    metrics records."""
    group = run_dir / "cases" / "case"
    group.mkdir(parents=True, exist_ok=True)
    for name, overrides in cases.items():
        # a config group's option (experiment=..., placement=...) is chosen in the defaults
        is_group = [(CONF_DIR / o.split("=", 1)[0]).is_dir() for o in overrides]
        chosen = dict(o.split("=", 1) for o, g in zip(overrides, is_group, strict=True) if g)
        values = OmegaConf.from_dotlist(
            [o for o, g in zip(overrides, is_group, strict=True) if not g]
        )
        # (the last choice of a group wins, as on a command line)
        defaults = "".join(f"  - override /{group}: {option}\n" for group, option in chosen.items())
        defaults = f"defaults:\n{defaults}" if chosen else ""
        text = f"# @package _global_\n{defaults}{OmegaConf.to_yaml(values)}"
        (group / f"{name}.yaml").write_text(text)
    sweep = [
        "-m",
        f"hydra.searchpath=[file://{run_dir / 'cases'}]",
        f"+case={','.join(cases)}",
        f"hydra.sweep.dir={run_dir}",
    ]
    out = run_cmd(main_cmd(nproc, *sweep), cwd=ROOT, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return {
        name: [json.loads(x) for x in (run_dir / str(i) / "metrics.jsonl").read_text().splitlines()]
        for i, name in enumerate(cases)
    }


def main_cmd(nproc: int, *overrides: str) -> list[str]:
    """The real entrypoint: plain python for one rank, torchrun otherwise."""
    if nproc == 1:
        return [sys.executable, "-m", "distflow_mc.main", *overrides]
    launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "distflow_mc.main", *overrides]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# The suite's time budget, so that it cannot grow back unnoticed: pytest prints the slowest
# tests after every run (--durations in pyproject.toml), and a test whose setup, call and
# teardown take longer than TEST_BUDGET_S, or a whole-suite run longer than SUITE_BUDGET_S,
# fails the run. The slowest test (the e2e sweep) took 65-90 s and the suite 10.5-11 min on
# the 2-core CI machine: the limits leave room for a slower day, not for a test that doubles;
# with the install (about a minute) the suite stays inside the project's 15 minutes.
TEST_BUDGET_S = 240.0
SUITE_BUDGET_S = 14 * 60.0
_spent: dict[str, float] = {}
_started = pytest.StashKey[float]()
_over: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _spent[report.nodeid] = _spent.get(report.nodeid, 0.0) + report.duration


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_started] = time.monotonic()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    took = time.monotonic() - session.config.stash[_started]
    _over.extend(f"{t:.0f} s  {test}" for test, t in _spent.items() if t > TEST_BUDGET_S)
    whole = not session.config.option.file_or_dir and not session.config.option.keyword
    if whole and took > SUITE_BUDGET_S:
        _over.append(f"{took:.0f} s  the whole suite (budget {SUITE_BUDGET_S:.0f} s)")
    if _over and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _over:
        terminalreporter.write_sep("=", "over the time budget (tests/conftest.py)", red=True)
        for line in _over:
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            f"(a test may take {TEST_BUDGET_S:.0f} s: split it, or share launches)"
        )
