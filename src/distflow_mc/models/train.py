"""A trainable Megatron model: DDP + megatron optimizer + LR schedule, one step per call."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.utils import to_local_if_dtensor, unwrap_model

from distflow_mc.config.schema import OptimConfig
from distflow_mc.models.router_stats import RouterStats
from distflow_mc.models.schedule import MicroBatch, OutputFn, run_microbatches
from distflow_mc.parallel.megatron_state import world_of


class TrainableModel:
    """Model chunks wrapped for training. `step` runs the micro-batches of one optimizer
    step through the pipeline schedule with the caller's loss, then steps the optimizer."""

    def __init__(
        self,
        chunks: list[MegatronModule],
        optim: OptimConfig,
        total_steps: int,
        group: dist.ProcessGroup | None = None,
    ):
        """`group`: the ranks holding the model when they are not the whole world."""
        config = chunks[0].config
        if config.bf16:
            chunks = [Float16Module(config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=optim.distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        with world_of(group):
            self.optimizer = self._optimizer(optim, config)
        decay = optim.decay_steps if optim.decay_steps is not None else total_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(decay, optim.warmup_steps + 1),
            lr_decay_style=optim.decay_style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        self.router_stats = RouterStats(self.chunks)  # MoE models; empty otherwise
        # The schedule reduces DP gradients (and tied embeddings over PP) through this hook.
        config.finalize_model_grads_func = self._finalize
        config.grad_scale_func = self.optimizer.scale_loss
        self.loss_count = 0.0  # the last step's loss count over every rank (the hook's)

    def _finalize(self, model: list, num_tokens: torch.Tensor | None, **kwargs: Any) -> None:
        """megatron's gradient finalization, which also sums the loss counts over the
        pipeline and the data-parallel ranks: kept, so that a step whose count is zero on
        every rank (no sample anywhere) can skip its update with no collective of its own."""
        finalize_model_grads(model, num_tokens, **kwargs)
        self.loss_count = float(num_tokens) if num_tokens is not None else 1.0

    def _optimizer(self, optim: OptimConfig, config: Any) -> Any:
        return get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=config.bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=optim.distributed_optimizer,
            ),
            self.chunks,
        )

    @property
    def modules(self) -> list[MegatronModule]:
        """The bare model chunks (for export and weight sync)."""
        return [unwrap_model(c, (DistributedDataParallel, Float16Module)) for c in self.chunks]

    def forward(self, microbatches: Sequence[MicroBatch], fn: OutputFn) -> list[Any]:
        """Forward only (e.g. old log-probs): fn's outputs on the last PP stage."""
        for c in self.chunks:
            c.eval()
        with torch.no_grad():
            return run_microbatches(self.chunks, microbatches, fn, forward_only=True)

    def step(self, microbatches: Sequence[MicroBatch], loss_fn: OutputFn) -> dict[str, Any]:
        """One optimizer step over `microbatches`; loss_fn returns (sum, count, metrics)."""
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = run_microbatches(self.chunks, microbatches, loss_fn, forward_only=False)
        empty = self.loss_count == 0  # the same on every rank: nothing to learn from
        grad_norm = 0.0 if empty else self.grad_norm()
        finite = math.isfinite(grad_norm)
        updated = False
        if finite and not empty:
            self.clip(grad_norm)
            updated = self.optimizer.step_with_ready_grads()
        if updated:
            self.scheduler.step(increment=1)
        return {
            "updated": bool(updated),
            "empty": empty,
            "nonfinite": not finite,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "microbatch_metrics": metrics,
            "router": self.router_stats.take(),
        }

    def grad_norm(self) -> float:
        """The global gradient norm (nan when a gradient is not finite): megatron reduces it
        over every rank holding a part of the model (TP, PP, EP; DP with the distributed
        optimizer), and DP replicas hold all-reduced gradients, so every rank gets the same
        value. A non-finite norm skips the optimizer step on every rank alike: the weights
        never take it in."""
        found_inf = self.optimizer.prepare_grads()
        return float("nan") if found_inf else float(self.optimizer.get_grad_norm())

    def clip(self, grad_norm: float) -> None:
        """Clip by the total norm already computed (megatron's step would compute it again),
        as megatron's clip_grad_by_total_norm_fp32 does, but each gradient scaled in place
        by torch's fused foreach (megatron's fallback without apex or TE allocates and copies
        every gradient)."""
        for part in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            coeff = part.config.clip_grad / (grad_norm + 1.0e-6)
            if part.config.clip_grad <= 0 or coeff >= 1.0:
                continue
            decoupled = part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            name = "decoupled_grad" if decoupled else "grad"
            grads = [getattr(p, name, None) for p in part.get_parameters()]
            grads = [to_local_if_dtensor(g).detach() for g in grads if g is not None]
            if grads:
                torch._foreach_mul_(grads, coeff)
