"""Everything a step needs, built once from the typed config on every rank."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distflow_mc.agent.loop import AgentLoop
from distflow_mc.agent.parser import get_parser
from distflow_mc.agent.tools import Tool, load_tools
from distflow_mc.algos import advantages as adv_fns
from distflow_mc.algos import losses
from distflow_mc.config.schema import AdvEstimator, Config, Dtype, PolicyLoss
from distflow_mc.dag import Plan, Role
from distflow_mc.data.dataset import RowSource
from distflow_mc.data.loader import PromptLoader
from distflow_mc.data.tiny import ensure_task
from distflow_mc.models.factory import load_model, load_reference
from distflow_mc.models.hf_config import HFArch, read_hf_config
from distflow_mc.models.train import TrainableModel
from distflow_mc.parallel.dist import DistContext
from distflow_mc.parallel.layout import Layouts
from distflow_mc.parallel.megatron_state import ModelParallel, init_model_parallel
from distflow_mc.rewards.compute import RewardComputer, check_sources
from distflow_mc.rollout.engine import RolloutEngine
from distflow_mc.rollout.factory import make_engine
from distflow_mc.stages.fields import stage_reads

log = logging.getLogger(__name__)


@dataclass
class Workers:
    config: Config
    ctx: DistContext
    layouts: Layouts
    mp: ModelParallel
    tokenizer: PreTrainedTokenizerBase
    arch: HFArch
    actor: TrainableModel
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
        self.rewards.close()


def model_dtype(dtype: Dtype) -> torch.dtype:
    """AUTO: bf16 on GPU, fp32 on CPU."""
    if dtype is Dtype.AUTO:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if dtype is Dtype.BFLOAT16 else torch.float32


def build_workers(config: Config, plan: Plan, layouts: Layouts, ctx: DistContext) -> Workers:
    a, t = config.algo, config.trainer
    roles = {n.role for n in plan.nodes}
    mp = init_model_parallel(config.parallel, seed=t.seed)
    model_dir = Path(config.model.path)
    if config.model.embedded_task:
        if ctx.local_rank == 0:
            ensure_task(model_dir.parent)
        dist.barrier()
    tools = check_inputs(config)
    dtype = model_dtype(config.model.dtype)
    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer or model_dir)
    # on every rank, before any model: a setting it refuses stops them all
    agent = AgentLoop(config.rollout.agent, tokenizer, tools) if tools is not None else None
    loader, val_loader = loaders(config, tokenizer, layouts, ctx.rank, tools)
    aux = config.model.router_aux_loss_coef
    arch, chunks = load_model(model_dir, mp, dtype, router_aux_loss_coef=aux)
    actor = TrainableModel(chunks, t.actor_optim, t.total_steps * a.ppo_epochs * a.mini_batches)
    reference = load_reference(model_dir, mp, dtype)[1] if Role.REFERENCE in roles else None
    critic = None
    if Role.CRITIC in roles:
        _, critic_chunks = load_model(model_dir, mp, dtype, True, aux)
        steps = t.total_steps * a.ppo_epochs * a.mini_batches
        critic = TrainableModel(critic_chunks, t.critic_optim, steps)
    if a.adv_estimator is AdvEstimator.GAE and critic is None:
        raise ValueError("algo.adv_estimator=GAE needs a CRITIC in algo.workflow (algo=ppo)")
    engine = make_engine(
        config.rollout, model_dir, layouts.rollout, tokenizer.pad_token_id, t.seed, ctx.device
    )
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
        outcome = partial(adv_fns.reinforce_pp_baseline, reduce=mp.dp_sum)
    elif a.adv_estimator is not AdvEstimator.GAE:
        outcome = adv_fns.OUTCOME_ESTIMATORS[a.adv_estimator.name]
    return Workers(
        config,
        ctx,
        layouts,
        mp,
        tokenizer,
        arch,
        actor,
        reference,
        critic,
        engine,
        agent,
        loader,
        val_loader,
        RewardComputer(config.reward),
        policy,
        outcome,
        stage_reads(plan, config, layouts.train.pp),
    )


def loaders(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    layouts: Layouts,
    rank: int,
    tools: dict[str, Tool] | None,
) -> tuple[PromptLoader | None, PromptLoader | None]:
    """The training and validation loaders of a rollout emitter (None elsewhere). Every
    rank builds them first and checks that each file has usable rows, so a file with none
    stops every rank before any model is built."""
    dp, size = layouts.rollout.coords(rank)["dp"], layouts.rollout.dp
    built = [PromptLoader(config.data, tokenizer, dp, size, config.trainer.seed, tools=tools)]
    built[0].check_usable("data.train_files")
    if config.trainer.val_every and config.data.val_files:
        built.append(validation_loader(config, tokenizer, dp, size, tools))
        built[1].check_usable("data.val_files")
    if rank not in layouts.rollout.emitters():
        return None, None
    return built[0], built[1] if len(built) > 1 else None


def check_inputs(config: Config) -> dict[str, Tool] | None:
    """The model and tokenizer directories exist, every data_source of the training and
    validation files has a scorer, and the agent's tools and parser load: checked on every
    rank before any model is built, so no rank meets a missing file or an unknown source
    mid-run. Returns the agent's tools (None: single-turn rollouts)."""
    d = config.data
    needed = [("model.path", config.model.path, "config.json")]
    if d.tokenizer is not None:
        needed.append(("data.tokenizer", d.tokenizer, "tokenizer_config.json"))
    for key, path, file in needed:
        if not (Path(path) / file).is_file():
            raise ValueError(
                f"{key}={path}: no {file} there; a local Hugging Face directory is expected"
                " (nothing is downloaded)"
            )
    check_lengths(config, read_hf_config(config.model.path))
    for key, files in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        if files:
            check_sources(config.reward, RowSource(files).data_sources(), f"{key} {files}")
    agent = config.rollout.agent
    if not agent.tools:
        return None
    get_parser(agent.parser)
    tools = load_tools(agent.tools)
    unknown = sorted(set(agent.tool_timeouts) - set(tools))
    if unknown:
        raise ValueError(
            f"rollout.agent.tool_timeouts names {unknown}, not tools of rollout.agent.tools"
            f" ({', '.join(tools)})"
        )
    return tools


def check_lengths(config: Config, arch: HFArch) -> None:
    """The longest sequence a rollout can make fits the model's positions: ValueError with
    the numbers when it does not; where it relies on the model's RoPE scaling (positions
    past the original context), say so once."""
    d, r = config.data, config.rollout
    if r.agent.tools:
        longest, settings = r.agent.max_total_tokens, "rollout.agent.max_total_tokens"
    else:
        longest = d.max_prompt_length + r.max_new_tokens
        settings = (
            f"data.max_prompt_length + rollout.max_new_tokens = {d.max_prompt_length} +"
            f" {r.max_new_tokens}"
        )
    limit = arch.max_position_embeddings
    if longest > limit:
        raise ValueError(
            f"{settings} = {longest} tokens exceeds max_position_embeddings={limit} of"
            f" model.path={config.model.path}: lower them (the model was not trained on"
            " positions past it)"
        )
    scaling = arch.rope_scaling
    if scaling is not None and longest > scaling.original_max_position_embeddings:
        log.info(
            "sequences of up to %d tokens (%s) reach past the model's original context of %d;"
            " its llama3 RoPE scaling (factor %s) covers up to %d",
            longest,
            settings,
            scaling.original_max_position_embeddings,
            scaling.factor,
            limit,
        )


def validation_loader(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    dp_rank: int,
    dp_size: int,
    tools: dict[str, Tool] | None = None,
) -> PromptLoader:
    """The whole held-out set as one step, in file order, split over the rollout ranks."""
    rows = RowSource(config.data.val_files).num_rows
    val = replace(
        config.data,
        train_files=config.data.val_files,
        batch_size=rows - rows % dp_size,
        shuffle=False,
        prefetch=False,
    )
    return PromptLoader(val, tokenizer, dp_rank, dp_size, config.trainer.seed, tools=tools)
