"""The embedded GRPO, PPO and vision-language (a tiny Qwen2.5-VL, images) runs end to end on
one CUDA GPU (NCCL beside gloo, world size 1, bf16 parameters, fp32 log-probs), through the
real entrypoint: the batch lives on the GPU from the engine's output to the loss. The TE
layer spec is used when importable, else megatron's local spec (the vision-language run
needs the local spec: TE's is refused for it). Skipped without CUDA.

A redistribution between two layouts needs two ranks, and NCCL needs a GPU per rank: with
one GPU every layout has the one replica [0], so nothing moves (tests/dist covers the moves
on gloo, with the same code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distflow_mc.data.tiny import make_task
from tests.conftest import ROOT, main_cmd, run_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_task(tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("experiment", ["cpu_tiny_grpo", "cpu_tiny_ppo", "cpu_tiny_vlm"])
def test_embedded_run_on_one_gpu(task, tmp_path, experiment):
    from distflow_mc.models.gpt import use_transformer_engine

    if experiment == "cpu_tiny_vlm" and use_transformer_engine():
        pytest.skip("vision-language models run on the local layer spec only (so far)")
    steps = 20
    cmd = main_cmd(
        1,
        f"experiment={experiment}",
        f"trainer.total_steps={steps}",
        "trainer.val_every=10",
        "model.dtype=BFLOAT16",
        "trainer.progress_bar=false",
        "parallel.timeout_s=120",
        f"hydra.run.dir={tmp_path}",
    )
    out = run_cmd(cmd, cwd=ROOT, timeout=600, env={"DISTFLOW_DATA_DIR": str(task)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert all(v == v for k, v in r.items() if k.startswith(("actor/", "reward/"))), r
        # fp32 engine against the bf16 actor: close, not equal
        assert r["rollout/logprob_gap_mean"] < 0.05, r["rollout/logprob_gap_mean"]
    print(experiment, "s/step", sum(r["time/step"] for r in rows[2:]) / (steps - 2))
