"""One rollout engine per rollout TP group, made on the group's leader rank(s)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from distflow_mc.config.schema import Engine, RolloutConfig
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
    """Called on every rank (collective for SGLang); returns the engine on the ranks that
    host one and None elsewhere. Those others still take part in weight sync."""
    rank = dist.get_rank()
    group = next(g for g in layout.replicas() if rank in g)
    if config.engine is Engine.HF:
        assert layout.tp == 1, "checked by config validation (rollout.tp)"
        return HFEngine(model_dir, pad_token_id, device)
    # SGLang: TP group on one node -> its first rank hosts the engine on the group's GPUs;
    # spanning nodes -> the first rank on each node hosts one, joined by SGLang itself.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = list(dict.fromkeys(hosts[r] for r in group))
    first_on_node = {hosts[r]: r for r in reversed(group)}
    if rank != first_on_node[hosts[rank]]:
        return None
    from distflow_mc.rollout.sglang_engine import SGLangEngine

    port = int(os.environ.get("MASTER_PORT", "29500")) + 1 + layout.coords(rank)["dp"]
    return SGLangEngine(
        model_dir,
        tp=config.tp,
        base_gpu_id=int(os.environ.get("LOCAL_RANK", "0")) % local_world,
        seed=seed,
        mem_fraction=config.mem_fraction,
        colocated=config.colocated,
        nnodes=len(nodes),
        node_rank=nodes.index(hosts[rank]),
        dist_init_addr=f"{nodes[0]}:{port}" if len(nodes) > 1 else None,
    )
