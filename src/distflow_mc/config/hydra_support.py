"""Hydra glue: schema registration and the resolvers that make every rank's output
directory the same path."""

from __future__ import annotations

import functools
import os
import time

import psutil
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from distflow_mc.config.schema import GROUP_SCHEMAS, Config


def register_schemas() -> None:
    """`distflow_schema` types the root; `<group>/schema` can head a group file's defaults."""
    cs = ConfigStore.instance()
    cs.store(name="distflow_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


def _stamp(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(epoch_s))


@functools.cache
def run_id() -> str:
    """A name for this run that every rank computes alike, without talking to the others.

    Hydra's default output dir is a per-process timestamp, which differs across ranks and
    nodes. In order of preference: DISTFLOW_RUN_ID; torchrun's rendezvous id (`--rdzv-id`,
    or the one `--standalone` draws); the Slurm job id; for a single-node torchrun without
    an id, the agent's start time and pid (shared by its workers and kept across restarts);
    for a plain `python -m`, this process's start time and pid. A multi-node run whose ranks
    still disagree is caught by the plan fingerprint, which covers the output directory.
    """
    explicit = os.environ.get("DISTFLOW_RUN_ID")
    if explicit:
        return explicit
    rdzv_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv_id and rdzv_id != "none":
        return rdzv_id
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        return f"slurm-{slurm_job}"
    pid = os.getppid() if rdzv_id else os.getpid()
    return f"{_stamp(psutil.Process(pid).create_time())}-{pid}"


def _rank0_only(value: str) -> str | None:
    return value if int(os.environ.get("RANK", "0")) == 0 else None


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("distflow.run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("distflow.rank0_only", _rank0_only, replace=True)
