"""One RL step = the plan's stage calls in order, redistributing the batch whenever the
layout changes (rollout -> train), then weight sync actor -> rollout engine. A move carries
only the fields the stages after it read, and the fields that are final before the last
stage of the old layout (the reward) leave while that stage runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from distflow_mc import checkpoint
from distflow_mc.checkpoint.hf_export import save_hf
from distflow_mc.config.schema import Placement, Resume
from distflow_mc.config.validate import canonical_config
from distflow_mc.dag import NodeType, Plan, PlannedNode, Role
from distflow_mc.dag.validate import import_fn
from distflow_mc.data.batch import Batch
from distflow_mc.data.redistribute import Balance, Transfer, redistribute
from distflow_mc.observability.metrics import Metrics, Sinks, derived
from distflow_mc.parallel.layout import Layout
from distflow_mc.parallel.megatron_state import world_of
from distflow_mc.rollout.guard import warn_on_gap
from distflow_mc.rollout.weight_sync import sync_weights
from distflow_mc.stages import advantage, passes, rollout, train
from distflow_mc.stages.fields import carried
from distflow_mc.stages.health import Health
from distflow_mc.stages.separate import fit_separate
from distflow_mc.stages.validate import validate
from distflow_mc.stages.workers import Workers

StageFn = Callable[[Workers, Batch | None, Metrics, int], Batch | None]
DEFAULTS: dict[tuple[Role | None, NodeType], StageFn] = {
    (Role.ROLLOUT, NodeType.MODEL_INFERENCE): rollout.generate,
    (Role.REWARD, NodeType.COMPUTE): rollout.reward,
    (Role.REFERENCE, NodeType.MODEL_INFERENCE): passes.ref_logprobs,
    (Role.ACTOR, NodeType.MODEL_INFERENCE): passes.old_logprobs,
    (Role.CRITIC, NodeType.MODEL_INFERENCE): passes.values,
    (None, NodeType.COMPUTE): advantage.compute,  # the built-in `advantage` node
    (Role.ACTOR, NodeType.MODEL_TRAIN): train.actor,
    (Role.CRITIC, NodeType.MODEL_TRAIN): train.critic,
}


@dataclass(frozen=True)
class Bound:
    """A plan node ready to run: its function and layout; `keep`: when the batch moves in
    before it, the fields the nodes from here on read (None: all, a node has its own fn);
    `early`: fields to start sending after it, final while the next node runs."""

    node: PlannedNode
    fn: StageFn
    layout: Layout
    keep: frozenset[str] | None = None
    early: frozenset[str] | None = None


def bind(plan: Plan, w: Workers) -> list[Bound]:
    """Each node's function (its `fn`, else the default for its role and type), layout, and
    what the moves around it carry (`carried`)."""
    fns = []
    for node in plan.nodes:
        fn = import_fn(node.fn) if node.fn else DEFAULTS.get((node.role, node.type))
        if fn is None:
            role = node.role.name if node.role else "role-free"
            raise ValueError(
                f"algo.workflow: node '{node.id}' ({role} {node.type.name}) has no default"
                " function: set its fn"
            )
        fns.append(fn)
    layouts = [w.layouts.for_role(n.role) for n in plan.nodes]
    keep, early = carried(plan, w.config, w.layouts)
    return [Bound(*args) for args in zip(plan.nodes, fns, layouts, keep, early, strict=True)]


def run_step(w: Workers, bound: list[Bound], step: int) -> Metrics:
    m = Metrics()
    batch, layout = None, w.layouts.rollout
    colocated = w.engine is not None and w.config.rollout.colocated
    transfer: Transfer | None = None
    phases: dict[str, float] = {}
    start = time.perf_counter()
    for i, b in enumerate(bound):
        tick = time.perf_counter()
        if b.layout != layout:
            if colocated and layout is w.layouts.rollout:
                w.engine.sleep()  # hand the accelerator memory to the trainer
            batch = move(w, batch, layout, b, transfer, phases)
            layout, transfer = b.layout, None
            m.set("time/redistribute", time.perf_counter() - tick)
            tick = time.perf_counter()
        batch = b.fn(w, batch, m, step)
        m.set(f"time/{b.node.id}", time.perf_counter() - tick)
        if b.early is not None:
            tick = time.perf_counter()
            to = bound[i + 2].layout
            args = (Balance(), w.ctx.device, w.ctx.timeout)
            transfer = Transfer(layout, to, *args, phases=phases, stages=stages(w, to))
            transfer.send(batch, b.early)
            m.set("time/redistribute_early", time.perf_counter() - tick)
    for phase, seconds in phases.items():
        m.set(f"time/redistribute_{phase}", seconds)
    tick = time.perf_counter()
    bucket = w.config.rollout.weight_sync_bucket_mb << 20
    sync_weights(w.actor.modules, w.arch, w.mp, w.engine, bucket)  # wakes a sleeping engine
    m.set("time/weight_sync", time.perf_counter() - tick)
    m.set("time/step", time.perf_counter() - start)
    return m


def move(
    w: Workers,
    batch: Batch | None,
    layout: Layout,
    to: Bound,
    transfer: Transfer | None,
    phases: dict[str, float],
) -> Batch | None:
    """The batch of `to`'s layout: the fields `to.keep` names (all when None), the ones a
    transfer already under way sent included; of them, each pipeline stage's ranks get
    what they read."""
    if transfer is None:
        args = (Balance(), w.ctx.device, w.ctx.timeout, to.keep)
        views = stages(w, to.layout)
        return redistribute(batch, layout, to.layout, *args, phases=phases, stages=views)
    transfer.send(batch, to.keep)
    return transfer.finish()


def stages(w: Workers, layout: Layout) -> tuple[frozenset[str] | None, ...] | None:
    """What each pipeline stage of `layout` reads, when it is the train layout."""
    return w.stage_reads if layout == w.layouts.train else None


def fit(w: Workers, plan: Plan, run_dir: str) -> list[dict[str, float]]:
    """The training loop: resume if asked, sync weights into the engines, then the steps;
    rank 0 sends each step's reduced metrics to the sinks; checkpoints every
    `trainer.save_every` steps and at the end."""
    t = w.config.trainer
    bound = bind(plan, w)
    ckpt_dir = Path(t.checkpoint_dir or Path(run_dir) / "checkpoints")
    models = {"actor": w.actor, **({"critic": w.critic} if w.critic else {})} if w.mp else {}
    start = resume(w, ckpt_dir, models)
    if w.ctx.rank == 0:
        keep_metrics_through(Path(run_dir) / "metrics.jsonl", start)
    separate = w.config.rollout.placement is Placement.SEPARATE
    if not separate:
        bucket = w.config.rollout.weight_sync_bucket_mb << 20
        sync_weights(w.actor.modules, w.arch, w.mp, w.engine, bucket)
    sinks = None
    if w.ctx.rank == 0:
        sinks = Sinks(
            run_dir,
            t.total_steps,
            start,
            t.tensorboard,
            t.wandb_project,
            t.progress_bar,
            w.config.name,
        )

    def save(step: int, loader: dict | None) -> None:
        """The models' ranks save (the train group's, under SEPARATE); `loader`: the loader
        state after the batch of `step` (rank 0 writes it)."""
        state = trainer_state(w, models, loader)
        with world_of(w.mp.group):
            checkpoint.save(ckpt_dir, step, models, state, t.keep_last)

    try:
        if separate:
            history = fit_separate(w, *split(bound, w.layouts.rollout), start, sinks, save)
        else:
            history = steps(w, bound, start, sinks, save)
    finally:  # a run that stops early ends the bar before its message is logged
        if sinks is not None:
            sinks.close()
    if t.export_hf and w.mp is not None:
        with world_of(w.mp.group):
            save_hf(w.actor.modules, w.arch, w.mp, w.config.model.path, Path(run_dir) / "hf")
    return history


def split(bound: list[Bound], rollout: Layout) -> tuple[list[Bound], list[Bound]]:
    """rollout.placement=SEPARATE: the nodes of the rollout layout, then the others; the
    rollout group runs the first, the train group the rest."""
    n = sum(b.layout == rollout for b in bound)
    if any(b.layout == rollout for b in bound[n:]) or n == len(bound):
        raise ValueError(
            "rollout.placement=SEPARATE needs every ROLLOUT and REWARD node of algo.workflow"
            " planned before the nodes that train, and some of those"
            f" ({[b.node.id for b in bound]}): one group generates and scores, the other takes"
            " the scored batches"
        )
    return bound[:n], bound[n:]


def steps(
    w: Workers,
    bound: list[Bound],
    start: int,
    sinks: Sinks | None,
    save: Callable[[int, dict | None], None],
) -> list[dict[str, float]]:
    """Steps `start`..total: each step's reduced metrics (rank 0 sends them to the sinks),
    validation and checkpoints when due; the health checks stop every rank alike."""
    t = w.config.trainer
    health = Health(w.config)
    history = []
    for step in range(start, t.total_steps):
        record = {"step": step + 1, **derived(run_step(w, bound, step).reduce())}
        if w.ctx.rank == 0:
            warn_on_gap(record, w.config.rollout.logprob_gap_warn)
        last = step + 1 == t.total_steps
        if t.val_every and ((step + 1) % t.val_every == 0 or last):
            record.update(validate(w, step))
        history.append(record)
        if sinks is not None:
            sinks.write(record)
        health.check(record, w.rewards.failed_sources)
        if t.save_every and ((step + 1) % t.save_every == 0 or last):
            save(step + 1, w.loader.state_dict() if w.loader else None)
    return history


def trainer_state(w: Workers, models: dict, loader: dict | None) -> dict:
    """What a resumed run needs besides the shards (rank 0 writes it)."""
    return {
        "loader": loader,
        "schedulers": {role: m.scheduler.state_dict() for role, m in models.items()},
        "config": canonical_config(w.config),
    }


def resume(w: Workers, ckpt_dir: Path, models: dict) -> int:
    """With trainer.resume=AUTO, restore the latest complete checkpoint (if any) and
    return its step (0 otherwise). Every rank must see the same checkpoint."""
    if w.config.trainer.resume is not Resume.AUTO:
        return 0
    found: list = [None] * w.ctx.world_size
    dist.all_gather_object(found, checkpoint.complete_steps(ckpt_dir))
    if any(f != found[0] for f in found):
        raise ValueError(
            f"ranks see different checkpoints in {ckpt_dir}: {found} (shared filesystem?)"
        )
    step = checkpoint.latest_intact_step(ckpt_dir)
    if step is None:
        return 0
    state = checkpoint.trainer_state(ckpt_dir, step)  # (a SEPARATE rollout rank's: the loader)
    # on every rank, before the load's collectives
    checkpoint.check_resumable(
        state["config"], canonical_config(w.config), list(state["schedulers"])
    )
    if w.mp is not None:
        with world_of(w.mp.group):
            checkpoint.load(ckpt_dir, step, models)
    if w.loader is not None:
        w.loader.load_state_dict(state["loader"])
    for role, model in models.items():
        model.scheduler.load_state_dict(state["schedulers"][role])
    return state["step"]


def keep_metrics_through(metrics: Path, step: int) -> None:
    """Drop the metrics an earlier attempt logged after `step` (the run goes on from
    there, or starts over), so that every step appears once."""
    if metrics.is_file():
        kept = [x for x in metrics.read_text().splitlines() if json.loads(x)["step"] <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
