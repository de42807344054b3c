"""Typed config: schema dataclasses, Hydra registration, loading and checks."""

from distflow_mc.config.hydra_support import register_resolvers, register_schemas, run_id
from distflow_mc.config.schema import (
    AlgoConfig,
    Config,
    DataConfig,
    Dtype,
    Engine,
    ModelConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)
from distflow_mc.config.validate import canonical_config, check_config, load_config

__all__ = [
    "AlgoConfig",
    "Config",
    "DataConfig",
    "Dtype",
    "Engine",
    "ModelConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "canonical_config",
    "check_config",
    "load_config",
    "register_resolvers",
    "register_schemas",
    "run_id",
]
