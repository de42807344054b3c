"""DictConfig -> typed Config, with the checks that a schema alone cannot express."""

from __future__ import annotations

import json
from dataclasses import asdict
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from distflow_mc.config.schema import Config


def _check(ok: bool, setting: str, message: str) -> list[str]:
    return [] if ok else [f"{setting}: {message}"]


def check_config(c: Config) -> None:
    """Raise ValueError listing every setting out of range, each named as a dotted key."""
    p, r, d = c.parallel, c.rollout, c.data
    problems = [
        *_check(p.tp >= 1, "parallel.tp", f"must be >= 1, got {p.tp}"),
        *_check(p.pp >= 1, "parallel.pp", f"must be >= 1, got {p.pp}"),
        *_check(
            p.cp == 1,
            "parallel.cp",
            f"context parallelism is not supported yet (got {p.cp}): nothing splits sequences"
            " over CP ranks (megatron's local layer spec cannot run it, and the TE spec needs"
            " load-balanced sequence chunks that are not built); use parallel.cp=1",
        ),
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
        *_check(r.tp >= 1, "rollout.tp", f"must be >= 1, got {r.tp}"),
        *_check(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}"),
        *_check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}"),
        *_check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}"),
        *_check(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1"),
        *_check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1"),
        *_check(0 < r.mem_fraction < 1, "rollout.mem_fraction", "must be in (0, 1)"),
        *_check(r.weight_sync_bucket_mb >= 1, "rollout.weight_sync_bucket_mb", "must be >= 1"),
        *_check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}"),
        *_check(d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1"),
        *_check(c.reward.timeout_s > 0, "reward.timeout_s", "must be > 0"),
        *_check(c.trainer.total_steps >= 0, "trainer.total_steps", "must be >= 0"),
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
