"""Process groups, rank layouts, and the cross-rank agreement check."""

from distflow_mc.parallel.dist import (
    AgreementError,
    DistContext,
    check_agreement,
    init_distributed,
    rank_from_env,
    ranks_per_node_from_env,
    world_size_from_env,
)
from distflow_mc.parallel.layout import (
    Layout,
    Layouts,
    Move,
    build_layouts,
    describe_placement,
    describe_plan,
    movement,
)

__all__ = [
    "AgreementError",
    "DistContext",
    "Layout",
    "Layouts",
    "Move",
    "build_layouts",
    "check_agreement",
    "describe_placement",
    "describe_plan",
    "init_distributed",
    "movement",
    "rank_from_env",
    "ranks_per_node_from_env",
    "world_size_from_env",
]
