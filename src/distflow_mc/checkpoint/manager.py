"""Atomic, resumable checkpoints.

    <checkpoint dir>/step_00000012/   model + optimizer shards (megatron dist_checkpointing)
                                      manifest.json (size and CRC-32 of every file)
                                      trainer_state.json (step, data loader, LR schedules,
                                      resolved config), written last
    <checkpoint dir>/latest           {"step": 12}, replaced atomically after the rename

A save is written to `.step_N.tmp`, renamed to `step_N` once every rank has finished, and
only then does `latest` move: an interrupted save is never taken for a complete one. A
resume verifies the manifest (the ranks split the files) and falls back to the newest
intact checkpoint, warning about each damaged one.
dist_checkpointing reshards, so a checkpoint resumes on another TP / PP / DP layout.
There are no generator states to restore: every random draw derives from (seed, step).
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from distflow_mc.models.train import TrainableModel

log = logging.getLogger(__name__)
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# the distributed optimizer's state in its own buckets, each rank its shard: it reshards over
# data (and context) parallel ranks (check_resumable refuses the rest). megatron's default
# format for it (flattened ranges) its own dist_checkpointing no longer takes, and its
# fully reshardable one fails to load torch's Adam (its per-parameter step)
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _chained(optimizer: Any) -> list[Any]:
    """A model's optimizers: megatron chains one per parameter group kind."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _torch_adam(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch Adam inside a distributed optimizer (megatron takes torch's where neither
    TransformerEngine's nor apex's fused Adam is installed); None otherwise."""
    inner = optimizer.optimizer if isinstance(optimizer, DistributedOptimizer) else None
    return inner if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else None


def _fresh_adam_state(optimizer: Any) -> None:
    """Adam's state before its first step (step 0, zero moments) for every parameter of a
    distributed optimizer that has none: torch's Adam makes it at the first step, and
    megatron's distributed optimizer (with torch's Adam, not TE's or apex's) reads every
    parameter's step as it builds the state a checkpoint saves (the run may not have
    stepped yet: every sample of its steps so far skipped) or loads into."""
    for adam in filter(None, map(_torch_adam, _chained(optimizer))):
        for p in (p for group in adam.param_groups for p in group["params"]):
            if not adam.state[p]:
                adam.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }


def _restore_steps(optimizer: Any, loaded: Any) -> None:
    """Each parameter's Adam step as saved. Megatron's distributed optimizer (with torch's
    Adam) sets the saved step on every parameter, then overwrites it with the step of the
    state it loaded into, and shares one step tensor between the parameters (Adam advances
    it once per parameter): wrong bias corrections after a resume, without this."""
    chained = _chained(optimizer)
    states = [loaded] if len(chained) == 1 else [v for _, v in sorted(loaded.items())]
    for opt, state in zip(chained, states, strict=True):
        if (adam := _torch_adam(opt)) is not None:
            (step,) = {float(g["step"]) for g in state["optimizer"]["param_groups"]}
            for s in adam.state.values():
                s["step"] = torch.tensor(step)


def _sharded(models: dict[str, TrainableModel], is_loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for role, model in models.items():
        _fresh_adam_state(model.optimizer)  # (also a save before any step was taken)
        chunks = model.modules
        model_sd = {
            f"chunk{i}": c.sharded_state_dict(prefix=f"{role}.chunk{i}.")
            for i, c in enumerate(chunks)
        }
        state[role] = {
            "model": model_sd,
            "optimizer": model.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=OPTIMIZER_FORMAT
            ),
        }
    return state


def complete_steps(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints, newest first. Directories without their trainer
    state (interrupted saves) and leftover temporaries are ignored."""
    complete = [p for p in Path(root).glob("step_*") if (p / STATE).is_file()]
    return sorted((int(p.name.split("_")[1]) for p in complete), reverse=True)


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _my_share(files: list[str]) -> list[str]:
    return files[dist.get_rank() :: dist.get_world_size()]


def _problem(path: Path, name: str, size: int, crc: int) -> str | None:
    file = path / name
    if not file.is_file():
        return f"{name} is missing"
    if file.stat().st_size != size:
        return f"{name} has {file.stat().st_size} bytes, the save wrote {size}"
    return None if _crc(file) == crc else f"{name} does not match its checksum"


def latest_intact_step(root: str | Path) -> int | None:
    """Collective. The newest complete checkpoint whose files match their manifest (each
    rank checks its share; a damaged one is named in a warning and skipped), or None when
    there is none. ValueError naming the directory when checkpoints exist but none is
    intact."""
    steps = complete_steps(root)
    for step in steps:
        path = Path(root) / f"step_{step:08d}"
        manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
        found = [_problem(path, n, *manifest[n]) for n in _my_share(sorted(manifest))]
        problems: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, [x for x in found if x])
        damaged = [x for per_rank in problems for x in per_rank]
        if not damaged:
            return step
        log.warning("checkpoint %s is damaged (%s): trying an older one", path, damaged[0])
    if steps:
        raise ValueError(
            f"no intact checkpoint in {root} (trainer.checkpoint_dir): every one of steps"
            f" {sorted(steps)} has damaged files; remove them or set trainer.resume=NEVER"
        )
    return None


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
    files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    mine = {name: [(tmp / name).stat().st_size, _crc(tmp / name)] for name in _my_share(files)}
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    if dist.get_rank() == 0:
        manifest = {k: v for share in shares for k, v in share.items()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
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


def load(root: str | Path, step: int, models: dict[str, TrainableModel]) -> None:
    """Collective. Restores models and optimizers in place (the trainer state:
    `trainer_state`)."""
    path = Path(root) / f"step_{step:08d}"
    loaded = dist_checkpointing.load(_sharded(models, is_loading=True), str(path))
    for role, model in models.items():
        for i, chunk in enumerate(model.modules):
            prefix = f"{role}.chunk{i}."  # keeps actor and critic apart in the checkpoint
            chunk.load_state_dict(
                {k.removeprefix(prefix): v for k, v in loaded[role]["model"][f"chunk{i}"].items()}
            )
        with torch.no_grad():  # (the distributed optimizer copies into its parameters' shards)
            model.optimizer.load_state_dict(loaded[role]["optimizer"])
        _restore_steps(model.optimizer, loaded[role]["optimizer"])
    log.info("resumed from %s", path)


# what a distributed optimizer's state (dp_reshardable) is laid out by, besides DP and CP
OPTIMIZER_LAYOUT = ("tp", "pp", "vpp", "ep", "first_stage_layers", "last_stage_layers")


def check_resumable(saved: dict, now: dict, roles: list[str]) -> None:
    """ValueError, naming the settings, when the optimizer state saved under config `saved`
    (canonical_config's dict) cannot load under `now`: the distributed optimizer's shards
    reshard over data (and context) parallel ranks only, and neither kind of optimizer
    state loads as the other."""
    for role in roles:
        key = f"{role}_optim"
        was, nowd = (c["trainer"][key]["distributed_optimizer"] for c in (saved, now))
        if was != nowd:
            raise ValueError(
                f"the checkpoint's optimizer state was saved with trainer.{key}."
                f"distributed_optimizer={str(was).lower()}: resume with the same setting"
            )
        changed = [
            f"parallel.{k}={saved['parallel'][k]} (now {now['parallel'][k]})"
            for k in OPTIMIZER_LAYOUT
            if saved["parallel"][k] != now["parallel"][k]
        ]
        if was and changed:
            raise ValueError(
                f"the checkpoint's distributed optimizer state (trainer.{key}) reshards over"
                f" data and context parallel ranks only; it was saved at {', '.join(changed)}:"
                " resume with those settings"
            )


def trainer_state(root: str | Path, step: int) -> dict:
    """The trainer state of a complete checkpoint (what a rank without models reads)."""
    return json.loads((Path(root) / f"step_{step:08d}" / STATE).read_text())
