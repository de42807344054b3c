"""Actor -> rollout engine weight sync after each training step.

Every rank takes part in the export (it gathers TP shards and passes PP stages around in
size-bounded buckets, see models/convert.py); the ranks that host an engine feed the
buckets to it, the others let each bucket go as soon as it has passed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule

from distflow_mc.models.convert import export_hf
from distflow_mc.models.hf_config import HFArch
from distflow_mc.parallel.megatron_state import ModelParallel
from distflow_mc.rollout.engine import Bucket, RolloutEngine
from distflow_mc.rollout.weight_stream import stream_buckets


def sync_weights(
    chunks: list[MegatronModule],
    arch: HFArch,
    mp: ModelParallel,
    engine: RolloutEngine | None,
    bucket_bytes: int = 256 << 20,
) -> None:
    buckets: Iterator[Bucket] = export_hf(chunks, arch, mp, bucket_bytes)
    if engine is None:
        for _ in buckets:
            pass
    else:
        engine.update_weights(buckets)


def sync_weights_to_group(
    chunks: list[MegatronModule],
    arch: HFArch,
    mp: ModelParallel,
    group: dist.ProcessGroup,
    src: int,
    device: torch.device,
    bucket_bytes: int = 256 << 20,
    trained_only: bool = False,
) -> None:
    """rollout.placement=SEPARATE, on the train ranks: every one takes part in the export,
    the first (`src`) streams each bucket over `group` (it and the engines' ranks, which
    receive with `stream_buckets(None, src, group, device)`); the others let each bucket go.
    `trained_only`: the parameters that train (the engines keep the rest from before)."""
    buckets: Iterator[Bucket] = export_hf(chunks, arch, mp, bucket_bytes, trained_only)
    if dist.get_rank() == src:
        buckets = stream_buckets(buckets, src, group, device)
    for _ in buckets:
        pass
