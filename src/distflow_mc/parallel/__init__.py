"""Process groups, rank layouts, and the cross-rank agreement check."""

from distflow_mc.parallel.dist import (
    AgreementError,
    DistContext,
    check_agreement,
    init_distributed,
    world_size_from_env,
)
from distflow_mc.parallel.layout import Layout, Layouts, build_layouts, describe_plan

__all__ = [
    "AgreementError",
    "DistContext",
    "Layout",
    "Layouts",
    "build_layouts",
    "check_agreement",
    "describe_plan",
    "init_distributed",
    "world_size_from_env",
]
