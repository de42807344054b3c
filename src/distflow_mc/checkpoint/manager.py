"""Atomic, resumable checkpoints.

    <checkpoint dir>/step_00000012/   model + optimizer shards (megatron dist_checkpointing)
                                      trainer_state.json (step, data loader, LR schedules,
                                      resolved config), written last
    <checkpoint dir>/latest           {"step": 12}, replaced atomically after the rename

A save is written to `.step_N.tmp`, renamed to `step_N` once every rank has finished, and
only then does `latest` move: an interrupted save is never taken for a complete one.
Loading reads tensors through dist_checkpointing and state as JSON: nothing is unpickled.
dist_checkpointing reshards, so a checkpoint resumes on another TP / PP / DP layout.
There are no generator states to restore: every random draw derives from (seed, step).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing

from distflow_mc.models.train import TrainableModel

log = logging.getLogger(__name__)
STATE = "trainer_state.json"


def _sharded(models: dict[str, TrainableModel], is_loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for role, model in models.items():
        chunks = model.modules
        model_sd = {
            f"chunk{i}": c.sharded_state_dict(prefix=f"{role}.chunk{i}.")
            for i, c in enumerate(chunks)
        }
        state[role] = {
            "model": model_sd,
            "optimizer": model.optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        }
    return state


def latest_step(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint, or None. Directories without their
    trainer state (interrupted saves) and leftover temporaries are ignored."""
    pointer = Path(root) / "latest"
    if pointer.is_file():
        step = json.loads(pointer.read_text())["step"]
        if (Path(root) / f"step_{step:08d}" / STATE).is_file():
            return step
    complete = sorted(p for p in Path(root).glob("step_*") if (p / STATE).is_file())
    return int(complete[-1].name.split("_")[1]) if complete else None


def save(
    root: str | Path, step: int, models: dict[str, TrainableModel], state: dict, keep_last: int
) -> Path:
    """Collective. Every rank writes its shards; rank 0 writes the state and commits."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(models, is_loading=False), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / "latest.tmp"
        pointer.write_text(json.dumps({"step": step}))
        pointer.replace(root / "latest")
        for old in sorted(root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load(root: str | Path, step: int, models: dict[str, TrainableModel]) -> dict:
    """Collective. Restores models and optimizers in place; returns the trainer state."""
    path = Path(root) / f"step_{step:08d}"
    loaded = dist_checkpointing.load(_sharded(models, is_loading=True), str(path))
    for role, model in models.items():
        for i, chunk in enumerate(model.modules):
            prefix = f"{role}.chunk{i}."  # keeps actor and critic apart in the checkpoint
            chunk.load_state_dict(
                {k.removeprefix(prefix): v for k, v in loaded[role]["model"][f"chunk{i}"].items()}
            )
        model.optimizer.load_state_dict(loaded[role]["optimizer"])
    log.info("resumed from %s", path)
    return json.loads((path / STATE).read_text())
