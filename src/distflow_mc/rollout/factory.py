"""One rollout engine per rollout TP group, made on the group's first rank."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from distflow_mc.config.schema import Engine, Placement, RolloutConfig
from distflow_mc.parallel.layout import Layout
from distflow_mc.rollout.engine import RolloutEngine
from distflow_mc.rollout.hf_engine import HFEngine


def make_engine(
    config: RolloutConfig,
    model_dir: str | Path,
    layout: Layout,
    pad_token_id: int,
    seed: int,
    device: torch.device,
) -> RolloutEngine | None:
    """Called on every rank; returns the engine on the first rank of each rollout TP group
    (its emitter) and None elsewhere. Those others still take part in weight sync.

    The transformers engine is unsharded: with rollout.tp > 1 one engine serves the whole
    group from its first rank. SGLang runs its own TP workers on the group's GPUs, which
    are on one node (`build_layouts` refuses groups that span nodes)."""
    rank = dist.get_rank()
    group = next(g for g in layout.replicas() if rank in g)
    if rank != group[0]:
        return None
    if config.engine is Engine.HF:
        return HFEngine(model_dir, pad_token_id, device)
    from distflow_mc.rollout.sglang_engine import SGLangEngine

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    return SGLangEngine(
        model_dir,
        tp=config.tp,
        base_gpu_id=int(os.environ.get("LOCAL_RANK", "0")) % local_world,
        seed=seed,
        mem_fraction=config.mem_fraction,
        colocated=config.colocated and config.placement is Placement.COLOCATED,
    )
