"""SPMD entrypoint. Every rank runs this same file:

    torchrun --nnodes N --nproc-per-node G -m distflow_mc.main algo=grpo

compose config -> check it -> plan -> init distributed -> agree on the plan -> run.
Everything before `init_distributed` is local, so a user error fails on every rank before any
collective could hang.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distflow_mc.config import (
    Config,
    Engine,
    canonical_config,
    load_config,
    register_resolvers,
    register_schemas,
)
from distflow_mc.dag import Plan, fingerprint, plan_workflow, prune
from distflow_mc.observability.logging import log_all_ranks
from distflow_mc.parallel import (
    DistContext,
    Layouts,
    build_layouts,
    check_agreement,
    describe_placement,
    describe_plan,
    init_distributed,
    rank_from_env,
    ranks_per_node_from_env,
    world_size_from_env,
)
from distflow_mc.rollout.sglang_engine import check_available as check_sglang
from distflow_mc.stages.fields import carried, check_reads, node_fields, stage_reads

if TYPE_CHECKING:
    from distflow_mc.stages.inputs import Inputs

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

register_schemas()
register_resolvers()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Every rank says in its own log file (and on the console) why it stopped: a user
    error (ValueError, naming the setting, file or row) in one line, with its traceback in
    the file only; anything else with its traceback."""
    try:
        run(cfg)
    except ValueError as e:
        log.error("%s", e)
        log.error("raised at", exc_info=True, extra={"console": False})
        raise SystemExit(1) from None
    except Exception:
        log.exception("stopped by an unexpected error")
        raise SystemExit(1) from None


def run(cfg: DictConfig) -> None:
    config = load_config(cfg)
    log_all_ranks(config.trainer.log_all_ranks)
    layouts = build_layouts(config, world_size_from_env(), ranks_per_node_from_env())
    if config.rollout.engine is Engine.SGLANG and not config.trainer.dry_run:
        check_sglang()
    planned = plan_workflow(config.algo.workflow)
    check_reads(planned, config)
    plan = prune(planned, node_fields(config))
    run_dir = HydraConfig.get().runtime.output_dir
    settings = {"config": canonical_config(config), "run_dir": run_dir}
    digest = fingerprint(plan, settings)
    inputs = None if config.trainer.dry_run else load_inputs(config, layouts)
    ctx = init_distributed(config.parallel.timeout_s)
    check_agreement(digest, {"plan": plan.canonical(), **settings}, ctx)
    log.info(
        "%s: algo=%s, %d nodes in %d stages, %d rank(s) agree on plan %s; output %s",
        config.name,
        config.algo.name,
        len(plan.nodes),
        len(plan.stages),
        ctx.world_size,
        digest[:12],
        run_dir,
    )
    if inputs is None:  # a dry run: the plan only
        views = stage_reads(plan, config, layouts.train.pp)
        lines = describe_plan(plan, layouts, *carried(plan, config, layouts), views)
        lines += describe_placement(config, layouts)
        log.info("plan:\n%s", "\n".join(lines))
        return
    train(config, plan, layouts, ctx, inputs, run_dir)


# The modules below load transformers and megatron: a refused run stops without them.
def load_inputs(config: Config, layouts: Layouts) -> Inputs:
    from distflow_mc.stages.inputs import load_inputs

    return load_inputs(config, layouts, rank_from_env())


def train(
    config: Config, plan: Plan, layouts: Layouts, ctx: DistContext, inputs: Inputs, run_dir: str
) -> None:
    from distflow_mc.stages.step import fit
    from distflow_mc.stages.workers import build_workers

    workers = build_workers(config, plan, layouts, ctx, inputs)
    try:
        fit(workers, plan, run_dir)
    finally:
        workers.close()


if __name__ == "__main__":
    main()
