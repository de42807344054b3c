"""DictConfig -> typed Config, with the checks that a schema alone cannot express."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from distflow_mc.config.schema import (
    AgentConfig,
    AlgoConfig,
    Config,
    DataConfig,
    Engine,
    LayerSpec,
    ModelConfig,
    OnStale,
    OptimConfig,
    ParallelConfig,
    Placement,
    RewardConfig,
    RolloutConfig,
    SharedPrefix,
    TrainerConfig,
)

# megatron's OptimizerParamScheduler
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def _check(ok: bool, setting: str, message: str) -> list[str]:
    return [] if ok else [f"{setting}: {message}"]


def _parallel(p: ParallelConfig) -> list[str]:
    return [
        *_check(p.tp >= 1, "parallel.tp", f"must be >= 1, got {p.tp}"),
        *_check(p.pp >= 1, "parallel.pp", f"must be >= 1, got {p.pp}"),
        *_check(p.cp >= 1, "parallel.cp", f"must be >= 1, got {p.cp}"),
        *_check(
            p.vpp is None or (p.vpp >= 2 and p.pp >= 2),
            "parallel.vpp",
            f"needs parallel.pp >= 2 and vpp >= 2, got pp={p.pp} vpp={p.vpp}",
        ),
        *_check(
            not p.sequence_parallel or p.tp >= 2,
            "parallel.sequence_parallel",
            "needs parallel.tp >= 2",
        ),
        *_check(p.timeout_s > 0, "parallel.timeout_s", f"must be > 0, got {p.timeout_s}"),
        *_check(p.ep >= 1, "parallel.ep", f"must be >= 1, got {p.ep}"),
        *[
            problem
            for key, value in (
                ("first_stage_layers", p.first_stage_layers),
                ("last_stage_layers", p.last_stage_layers),
            )
            for problem in _check(
                value is None or (value >= 1 and p.pp >= 2),
                f"parallel.{key}",
                f"needs parallel.pp >= 2 and a value >= 1, got pp={p.pp}, {value}",
            )
        ],
    ]


def _rollout(r: RolloutConfig) -> list[str]:
    return [
        *_check(r.tp >= 1, "rollout.tp", f"must be >= 1, got {r.tp}"),
        *_check(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}"),
        *_check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}"),
        *_check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}"),
        *_check(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1"),
        *_check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1"),
        *_check(0 < r.mem_fraction < 1, "rollout.mem_fraction", "must be in (0, 1)"),
        *_check(r.weight_sync_bucket_mb >= 1, "rollout.weight_sync_bucket_mb", "must be >= 1"),
        *_check(r.logprob_gap_warn > 0, "rollout.logprob_gap_warn", "must be > 0"),
        *_check(
            not r.partial or (r.placement is Placement.SEPARATE and r.engine is Engine.HF),
            "rollout.partial",
            "needs rollout.placement=SEPARATE (weights arrive during generation only there)"
            " and rollout.engine=HF (SGLang's pause and resume are not wired yet)",
        ),
        *_check(
            (r.placement is Placement.SEPARATE) == (r.ranks >= 1) and r.ranks >= 0,
            "rollout.ranks",
            f"must be >= 1 with rollout.placement=SEPARATE and 0 otherwise, got {r.ranks}",
        ),
    ]


def _agent(g: AgentConfig, max_prompt_length: int) -> list[str]:
    return [
        *_check(g.max_turns >= 1, "rollout.agent.max_turns", f"must be >= 1, got {g.max_turns}"),
        *_check(
            g.max_total_tokens > max_prompt_length,
            "rollout.agent.max_total_tokens",
            f"must be > data.max_prompt_length={max_prompt_length}, got {g.max_total_tokens}",
        ),
        *_check(g.tool_timeout_s > 0, "rollout.agent.tool_timeout_s", "must be > 0"),
        *[
            problem
            for name, value in g.tool_timeouts.items()
            for problem in _check(value > 0, f"rollout.agent.tool_timeouts.{name}", "must be > 0")
        ],
        *_check(
            g.max_tool_output_chars >= 1, "rollout.agent.max_tool_output_chars", "must be >= 1"
        ),
    ]


def _algo(a: AlgoConfig, max_new_tokens: int) -> list[str]:
    def share(name: str, value: float) -> list[str]:
        return _check(0 <= value <= 1, f"algo.{name}", f"must be in [0, 1], got {value}")

    clip_low, clip_high = a.clip_low, a.clip_high
    return [
        *_check(clip_low is None or 0 < clip_low < 1, "algo.clip_low", "must be in (0, 1)"),
        *_check(clip_high is None or clip_high > 0, "algo.clip_high", "must be > 0"),
        *_check(
            a.dual_clip is None or a.dual_clip > 1, "algo.dual_clip", "must be > 1 (or null: off)"
        ),
        *_check(a.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {a.kl_coef}"),
        *_check(math.isfinite(a.entropy_coef), "algo.entropy_coef", "must be finite"),
        *share("gamma", a.gamma),
        *share("lam", a.lam),
        *_check(
            a.value_clip is None or a.value_clip > 0, "algo.value_clip", "must be > 0 (or null)"
        ),
        *_check(a.ppo_epochs >= 1, "algo.ppo_epochs", f"must be >= 1, got {a.ppo_epochs}"),
        *_check(a.mini_batches >= 1, "algo.mini_batches", f"must be >= 1, got {a.mini_batches}"),
        *_check(
            a.dynamic_sampling_max_rounds >= 1,
            "algo.dynamic_sampling_max_rounds",
            f"must be >= 1, got {a.dynamic_sampling_max_rounds}",
        ),
        *_check(
            0 <= a.overlong_buffer < max_new_tokens,
            "algo.overlong_buffer",
            f"must be in [0, rollout.max_new_tokens={max_new_tokens}), got {a.overlong_buffer}",
        ),
        *_check(a.overlong_penalty >= 0, "algo.overlong_penalty", "must be >= 0"),
        *_correction(a),
    ]


def _correction(a: AlgoConfig) -> list[str]:
    low, high, cap = a.mis_low, a.mis_high, a.tis_cap
    return [
        *_check(cap is None or cap > 0, "algo.tis_cap", f"must be > 0 (or null: off), got {cap}"),
        *_check(low is None or low >= 0, "algo.mis_low", f"must be >= 0 (or null), got {low}"),
        *_check(high is None or high > 0, "algo.mis_high", f"must be > 0 (or null), got {high}"),
        *_check(
            low is None or high is None or low < high,
            "algo.mis_low",
            f"must be below algo.mis_high={high}, got {low}",
        ),
        *_check(
            low is None or high is not None or cap is not None,
            "algo.mis_low",
            "alone leaves the importance weights unbounded above: set algo.tis_cap or"
            " algo.mis_high too",
        ),
    ]


def _optim(o: OptimConfig, name: str) -> list[str]:
    key = f"trainer.{name}"
    return [
        *_check(o.lr > 0, f"{key}.lr", f"must be > 0, got {o.lr}"),
        *_check(0 <= o.min_lr <= o.lr, f"{key}.min_lr", f"must be in [0, lr], got {o.min_lr}"),
        *_check(o.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0"),
        *_check(o.decay_steps is None or o.decay_steps >= 1, f"{key}.decay_steps", "must be >= 1"),
        *_check(
            o.decay_style in DECAY_STYLES,
            f"{key}.decay_style",
            f"must be one of {', '.join(DECAY_STYLES)}, got '{o.decay_style}'",
        ),
        *_check(o.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0"),
        *_check(0 <= o.adam_beta1 < 1, f"{key}.adam_beta1", "must be in [0, 1)"),
        *_check(0 <= o.adam_beta2 < 1, f"{key}.adam_beta2", "must be in [0, 1)"),
        *_check(o.adam_eps > 0, f"{key}.adam_eps", "must be > 0"),
        *_check(o.clip_grad >= 0, f"{key}.clip_grad", "must be >= 0 (0: no clipping)"),
    ]


def _trainer_and_data(
    t: TrainerConfig, d: DataConfig, reward: RewardConfig, model: ModelConfig
) -> list[str]:
    return [
        *_check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}"),
        *_check(d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1"),
        *_check(bool(d.train_files), "data.train_files", "must list at least one file"),
        *_check(reward.timeout_s > 0, "reward.timeout_s", "must be > 0"),
        *_check(reward.max_failing_steps >= 1, "reward.max_failing_steps", "must be >= 1"),
        *_check(d.max_empty_steps >= 1, "data.max_empty_steps", "must be >= 1"),
        *_check(d.max_image_pixels >= 1, "data.max_image_pixels", "must be >= 1"),
        *_check(math.isfinite(reward.error_score), "reward.error_score", "must be finite"),
        *_check(model.router_aux_loss_coef >= 0, "model.router_aux_loss_coef", "must be >= 0"),
        *_check(t.total_steps >= 0, "trainer.total_steps", "must be >= 0"),
        *_check(t.micro_batch_tokens >= 1, "trainer.micro_batch_tokens", "must be >= 1"),
        *_check(t.val_every >= 0, "trainer.val_every", "must be >= 0 (0: off)"),
        *_check(t.val_n >= 1, "trainer.val_n", f"must be >= 1, got {t.val_n}"),
        *_check(t.save_every >= 0, "trainer.save_every", "must be >= 0 (0: never)"),
        *_check(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}"),
        *_check(
            not (t.sequence_packing and _transformer_engine(model.layer_spec)),
            "trainer.sequence_packing",
            "packs rows for the local layer spec's attention; TransformerEngine's spec runs"
            " here (model.layer_spec), whose packed (THD) path is not wired: set it false, or"
            " model.layer_spec=LOCAL",
        ),
        *_check(
            t.shared_prefix is not SharedPrefix.ALWAYS or not _transformer_engine(model.layer_spec),
            "trainer.shared_prefix",
            "ALWAYS needs the local layer spec's attention (a sample's tokens attend to its"
            " group's prompt in another span of the row); TransformerEngine's spec runs here"
            " (model.layer_spec): set it NEVER (AUTO stays off there), or"
            " model.layer_spec=LOCAL",
        ),
    ]


def _transformer_engine(spec: LayerSpec) -> bool:
    """Whether TransformerEngine's layer spec runs for model.layer_spec = `spec`."""
    from distflow_mc.models.gpt import use_transformer_engine  # megatron: only when asked

    return use_transformer_engine(spec.value)


def _context_parallel(c: Config) -> list[str]:
    """What parallel.cp > 1 runs so far (models/context.py): the rest, refused by name."""
    if c.parallel.cp == 1:
        return []
    return [
        *_check(
            not _transformer_engine(c.model.layer_spec),
            "parallel.cp",
            "> 1 with TransformerEngine's spec (model.layer_spec) is not built yet (TE's own"
            " CP attention): set model.layer_spec=LOCAL (the local spec's CP attention)",
        ),
        *_check(
            c.model.router_aux_loss_coef == 0,
            "model.router_aux_loss_coef",
            "> 0 with parallel.cp > 1 is refused: each CP rank's router would balance the"
            " tokens it holds (part of every sequence), not the whole batch's: set it 0",
        ),
    ]


def _stream(c: Config) -> list[str]:
    r = c.rollout
    return [
        *_check(
            not r.stream or r.placement is Placement.SEPARATE,
            "rollout.stream",
            "needs rollout.placement=SEPARATE: groups go on across steps only while the"
            " train group trains",
        ),
        *_check(
            r.stream_chunk >= 0 and (r.stream or not r.stream_chunk),
            "rollout.stream_chunk",
            f"must be >= 0, and is read only with rollout.stream=true, got {r.stream_chunk}",
        ),
        *_check(
            not r.stream or c.trainer.max_staleness >= 2,
            "rollout.stream",
            "needs trainer.max_staleness >= 2: the rollout runs k - 1 versions ahead and a"
            f" group may wait one step more, got k={c.trainer.max_staleness}",
        ),
        *_check(
            not (r.stream and c.algo.dynamic_sampling),
            "rollout.stream",
            "does not combine with algo.dynamic_sampling (a step's groups would wait on its"
            " extra rounds): set one of them false",
        ),
        *_check(
            c.trainer.on_stale is OnStale.WAIT or r.stream,
            "trainer.on_stale",
            "DROP needs rollout.stream=true: without it no group is ever deferred",
        ),
    ]


def check_config(c: Config) -> None:
    """Raise ValueError listing every setting out of range, each named as a dotted key."""
    problems = [
        *_parallel(c.parallel),
        *_rollout(c.rollout),
        *_agent(c.rollout.agent, c.data.max_prompt_length),
        *_algo(c.algo, c.rollout.max_new_tokens),
        *_optim(c.trainer.actor_optim, "actor_optim"),
        *_optim(c.trainer.critic_optim, "critic_optim"),
        *_trainer_and_data(c.trainer, c.data, c.reward, c.model),
        *_check(c.trainer.max_staleness >= 0, "trainer.max_staleness", "must be >= 0"),
        *_check(
            c.trainer.weight_sync_every >= 1
            and (c.trainer.weight_sync_every == 1 or c.rollout.placement is Placement.SEPARATE),
            "trainer.weight_sync_every",
            f"must be >= 1, and 1 unless rollout.placement=SEPARATE (a colocated engine takes"
            f" the actor after every step), got {c.trainer.weight_sync_every}",
        ),
        *_stream(c),
        *_context_parallel(c),
        *_check(
            c.model.layer_spec is not LayerSpec.TE or _transformer_engine(LayerSpec.AUTO),
            "model.layer_spec",
            "TE needs a GPU with transformer_engine installed, which this machine lacks: set"
            " AUTO or LOCAL",
        ),
    ]
    if problems:
        raise ValueError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def load_config(cfg: DictConfig) -> Config:
    """Convert Hydra's composed config to typed objects and check it. Nothing below main.py
    sees a DictConfig."""
    try:
        config = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ValueError(
            f"missing required setting '{e.full_key}': set it in a config or as an "
            f"override ({e.full_key}=...)"
        ) from e
    assert isinstance(config, Config), type(config)
    check_config(config)
    return config


def canonical_config(config: Config) -> dict[str, Any]:
    """The resolved config as plain JSON types, without the workflow (the plan stands for
    it, independent of the order nodes were written in)."""
    data = asdict(config)
    del data["algo"]["workflow"]
    return json.loads(json.dumps(data, default=lambda o: o.name if isinstance(o, Enum) else str(o)))
