"""Everything a step needs, built once from the typed config on every rank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule
from transformers import PreTrainedTokenizerBase

from distflow_mc.agent.loop import AgentLoop
from distflow_mc.agent.stream import AgentStream
from distflow_mc.algos import advantages as adv_fns
from distflow_mc.algos import losses
from distflow_mc.algos.correction import Correction, behaviour_weights
from distflow_mc.config.schema import (
    AdvEstimator,
    AlgoConfig,
    Config,
    Dtype,
    MisLevel,
    Placement,
    PolicyLoss,
    Recompute,
)
from distflow_mc.dag import Plan, Role
from distflow_mc.data.loader import PromptLoader
from distflow_mc.models.factory import load_model, load_reference
from distflow_mc.models.hf_config import HFArch, read_hf_config
from distflow_mc.models.train import TrainableModel
from distflow_mc.parallel.dist import DistContext
from distflow_mc.parallel.layout import Layouts
from distflow_mc.parallel.megatron_state import ModelParallel, init_model_parallel
from distflow_mc.rewards.compute import RewardComputer
from distflow_mc.rollout.engine import RolloutEngine
from distflow_mc.rollout.factory import make_engine
from distflow_mc.rollout.hf_engine import Interrupt
from distflow_mc.stages.fields import corrected, stage_reads
from distflow_mc.stages.inputs import Inputs


@dataclass
class Workers:
    """On a rank of the train layout: the megatron models (`mp` set); on a rank of the
    rollout layout: the engine (on its TP group's first rank), loaders and rewards. Under
    COLOCATED every rank is both; under SEPARATE each is one (the others are None)."""

    config: Config
    ctx: DistContext
    layouts: Layouts
    mp: ModelParallel | None
    tokenizer: PreTrainedTokenizerBase
    arch: HFArch
    actor: TrainableModel | None
    reference: list[MegatronModule] | None
    critic: TrainableModel | None
    engine: RolloutEngine | None
    agent: AgentLoop | None  # when rollout.agent.tools is set
    loader: PromptLoader | None  # on rollout emitters
    val_loader: PromptLoader | None  # on rollout emitters, when validation is on
    rewards: RewardComputer
    # (logp, old, adv, mask, segments=) -> (per-token loss, clipped)
    policy_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    outcome_advantage: Callable[..., torch.Tensor] | None  # (rewards, groups); None: GAE
    # per pipeline stage, the batch fields its ranks read (stages.fields.stage_reads)
    stage_reads: tuple[frozenset[str] | None, ...] | None = None
    # (prox, behaviour log-probs, mask, segments=) -> Correction; None: no correction
    correction: Callable[..., Correction] | None = None
    # the rollout layout's ranks when they are not the whole world (SEPARATE)
    rollout_group: dist.ProcessGroup | None = None
    # rollout.partial: what lets a running generation take new weights (set by the
    # SEPARATE loop on the ranks with an engine)
    interrupt: Interrupt | None = None
    # rollout.stream: this rank's groups in flight across steps (set like `interrupt`)
    stream: AgentStream | None = None

    @property
    def reads_all(self) -> bool:
        """This rank holds every field of the train-layout batch (else only its stage's)."""
        return self.stage_reads is None or self.mp.is_last_stage

    @property
    def rollout_rank(self) -> int:
        return self.layouts.rollout.coords(self.ctx.rank)["dp"]

    @property
    def is_rollout_emitter(self) -> bool:
        return self.ctx.rank in self.layouts.rollout.emitters()

    def close(self) -> None:
        """Stop the engine and the loaders' prefetch threads: a sweep runs its next job in
        this same process."""
        for loader in (self.loader, self.val_loader):
            if loader is not None:
                loader.close()
        if self.engine is not None:
            self.engine.shutdown()
        if self.stream is not None:
            self.stream.close()
        self.rewards.close()


def model_dtype(dtype: Dtype) -> torch.dtype:
    """AUTO: bf16 on GPU, fp32 on CPU."""
    if dtype is Dtype.AUTO:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if dtype is Dtype.BFLOAT16 else torch.float32


def build_workers(
    config: Config, plan: Plan, layouts: Layouts, ctx: DistContext, inputs: Inputs
) -> Workers:
    """The models, the engine and the algorithm's functions around the checked `inputs`:
    each on the ranks of its layout."""
    a, t = config.algo, config.trainer
    separate = config.rollout.placement is Placement.SEPARATE
    train_ranks = layouts.train.world_size if separate else None
    mp = init_model_parallel(config.parallel, seed=t.seed, ranks=train_ranks)
    rollout_group = None
    if separate:  # every rank makes every group (new_group is collective)
        rollout_group = dist.new_group(list(layouts.rollout.ranks), timeout=ctx.timeout)
    model_dir = Path(config.model.path)
    arch, actor, reference, critic = read_hf_config(model_dir), None, None, None
    if mp is not None:
        arch, actor, reference, critic = _models(config, plan, mp)
    engine = None
    if ctx.rank in layouts.rollout.ranks:
        pad = inputs.tokenizer.pad_token_id
        engine = make_engine(config.rollout, model_dir, layouts.rollout, pad, t.seed, ctx.device)
    loss_fn = losses.gspo if a.policy_loss is PolicyLoss.GSPO else losses.ppo_clip
    bounds = {
        k: v for k, v in (("clip_low", a.clip_low), ("clip_high", a.clip_high)) if v is not None
    }
    if a.policy_loss is PolicyLoss.GSPO:
        policy = partial(loss_fn, **bounds)
    else:
        clip = partial(loss_fn, dual_clip=a.dual_clip, **bounds)

        def policy(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, *_, **__):
            return clip(logp, old, adv)  # token-level: the mask applies in aggregation

    outcome = None
    if a.adv_estimator is AdvEstimator.REINFORCE_PP:  # its std is over the whole batch
        outcome = partial(adv_fns.reinforce_pp_baseline, reduce=mp.dp_sum) if mp else None
    elif a.adv_estimator is not AdvEstimator.GAE:
        outcome = adv_fns.OUTCOME_ESTIMATORS[a.adv_estimator.name]
    return Workers(
        config,
        ctx,
        layouts,
        mp,
        inputs.tokenizer,
        arch,
        actor,
        reference,
        critic,
        engine,
        inputs.agent,
        inputs.loader,
        inputs.val_loader,
        RewardComputer(config.reward),
        policy,
        outcome,
        stage_reads(plan, config, layouts.train.pp),
        correction(a),
        rollout_group,
    )


def _models(
    config: Config, plan: Plan, mp: ModelParallel
) -> tuple[HFArch, TrainableModel, list[MegatronModule] | None, TrainableModel | None]:
    """The architecture, actor, reference (when a node reads it) and critic (when the
    workflow has one) on a rank of the train layout."""
    a, t = config.algo, config.trainer
    roles = {n.role for n in plan.nodes}
    model_dir, dtype = Path(config.model.path), model_dtype(config.model.dtype)
    aux = config.model.router_aux_loss_coef
    steps = t.total_steps * a.ppo_epochs * a.mini_batches
    recompute = None if t.recompute is Recompute.NONE else t.recompute.value.lower()
    frozen, spec = config.model.freeze_vision, config.model.layer_spec.value
    arch, chunks = load_model(model_dir, mp, dtype, False, aux, recompute, frozen, spec)
    actor = TrainableModel(chunks, t.actor_optim, steps, group=mp.group)
    reference = load_reference(model_dir, mp, dtype, spec)[1] if Role.REFERENCE in roles else None
    critic = None
    if Role.CRITIC in roles:
        _, critic_chunks = load_model(model_dir, mp, dtype, True, aux, recompute, frozen, spec)
        critic = TrainableModel(critic_chunks, t.critic_optim, steps, group=mp.group)
    return arch, actor, reference, critic


def correction(a: AlgoConfig) -> Callable[..., Correction] | None:
    if not corrected(a):
        return None
    bounds = {"tis_cap": a.tis_cap, "mis_low": a.mis_low, "mis_high": a.mis_high}
    return partial(behaviour_weights, **bounds, sequence=a.mis_level is MisLevel.SEQUENCE)
