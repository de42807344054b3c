"""megatron-core's parallel state, initialised once from the `parallel` config, handed to
the rest of the code as one typed object."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from distflow_mc.config.schema import ParallelConfig
from distflow_mc.parallel.cpu_compat import apply_cpu_compat


@dataclass(frozen=True)
class ModelParallel:
    tp: int
    pp: int
    dp: int
    cp: int
    vpp: int | None
    sequence_parallel: bool
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    first_stage_layers: int | None = None  # parallel.first_stage_layers (null: automatic)
    last_stage_layers: int | None = None
    ep: int = 1  # expert parallel: experts of a MoE layer split over ep ranks
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    # the ranks that hold the model when they are not the whole world (SEPARATE placement)
    group: dist.ProcessGroup | None = None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def dp_sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the data-parallel replicas, in place (batch-wide statistics)."""
        if self.dp > 1:
            dist.all_reduce(x, group=self.dp_group)
        return x

    @property
    def emits_data(self) -> bool:
        """One rank per model replica hands results on: TP rank 0 of the last stage."""
        return self.tp_rank == 0 and self.is_last_stage


_scope = threading.local()  # the group world_of makes the default, per thread
_real_default_group = c10d._get_default_group


def _default_group() -> dist.ProcessGroup:
    group = getattr(_scope, "group", None)
    return group if group is not None else _real_default_group()


@contextmanager
def world_of(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Inside, torch's default group (the world, for every call given no group) is `group`
    (None: nothing changes), for what megatron-core does over the world on the ranks that
    hold a model: its optimizer builder's all_gather_object of the parameter groups, and
    dist_checkpointing's save and load. For a model on the first ranks of the world only
    (rollout.placement=SEPARATE), so ranks in the group keep their global rank numbers.
    Only in the calling thread: a channel thread moving data over the world meanwhile
    still sees the world."""
    if group is None:
        yield
        return
    before = getattr(_scope, "group", None)
    _scope.group = group
    c10d._get_default_group = _default_group  # stays: outside a scope it is the real one
    try:
        yield
    finally:
        _scope.group = before


@contextmanager
def _world_size(size: int | None) -> Iterator[None]:
    """megatron-core makes its groups over the whole world: told that it has `size` ranks,
    it makes them over the first `size` (every rank still takes part in making each)."""
    if size is None:
        yield
        return
    real = dist.get_world_size
    dist.get_world_size = lambda group=None: size if group is None else real(group)
    try:
        yield
    finally:
        dist.get_world_size = real


def init_model_parallel(
    parallel: ParallelConfig, seed: int, ranks: int | None = None
) -> ModelParallel | None:
    """(Re)initialise megatron's groups on the already initialised default group. With
    `ranks`, the model lives on the first `ranks` ranks only: every rank still makes every
    group (making a group is collective) and the others, holding no model, get None."""
    apply_cpu_compat()
    world = ranks or dist.get_world_size()
    size = parallel.tp * parallel.pp * parallel.cp
    if world % size:
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp x parallel.pp x parallel.cp"
            f" = {size}"
        )
    # (a rank outside the model's ranks never counts as initialised: reset it all the same)
    mpu.destroy_model_parallel()
    timeout = timedelta(seconds=parallel.timeout_s)
    group = dist.new_group(list(range(ranks)), timeout=timeout) if ranks else None
    with _world_size(ranks):
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            distributed_timeout_minutes=max(1, math.ceil(parallel.timeout_s / 60)),
        )
    if ranks and dist.get_rank() >= ranks:
        return None
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ModelParallel(
        tp=parallel.tp,
        pp=parallel.pp,
        dp=mpu.get_data_parallel_world_size(),
        cp=parallel.cp,
        vpp=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        first_stage_layers=parallel.first_stage_layers,
        last_stage_layers=parallel.last_stage_layers,
        ep=parallel.ep,
        ep_rank=mpu.get_expert_model_parallel_rank(),
        ep_group=mpu.get_expert_model_parallel_group(),
        group=group,
    )
