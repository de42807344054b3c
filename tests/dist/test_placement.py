"""The placement rule, checked on CPU: during real GRPO and PPO steps (rollout, reward,
passes, advantages, training, weight sync, validation) every tensor factory called from
distflow_mc names its device. On a GPU a factory without one makes a CPU tensor next to
the batch's CUDA tensors (tests/gpu runs the same steps on CUDA)."""

from __future__ import annotations

import json
import sys

import pytest

from distflow_mc.data.tiny import make_task
from tests.conftest import ROOT, run_cmd

pytestmark = pytest.mark.dist


def test_every_factory_names_its_device(tmp_path):
    task = make_task(tmp_path / "task")
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "dist" / "placement_worker.py"),
        "--out",
        str(out),
        "trainer.val_every=1",
        "data.batch_size=4",
        "rollout.n=4",
        "trainer.progress_bar=false",
    ]
    proc = run_cmd(cmd, cwd=ROOT, timeout=240, env={"DISTFLOW_DATA_DIR": str(task)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report == {"cpu_tiny_grpo": [], "cpu_tiny_ppo": []}
