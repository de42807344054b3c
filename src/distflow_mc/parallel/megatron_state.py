"""megatron-core's parallel state, initialised once from the `parallel` config, handed to
the rest of the code as one typed object."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


def init_model_parallel(parallel: ParallelConfig, seed: int) -> ModelParallel:
    """(Re)initialise megatron's groups on the already initialised default group."""
    apply_cpu_compat()
    world = dist.get_world_size()
    size = parallel.tp * parallel.pp * parallel.cp
    if world % size:
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp x parallel.pp x parallel.cp"
            f" = {size}"
        )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        distributed_timeout_minutes=max(1, math.ceil(parallel.timeout_s / 60)),
    )
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
    )
