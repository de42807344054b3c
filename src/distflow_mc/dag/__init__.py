"""Workflow DAG: node spec, validation, deterministic planning and its fingerprint."""

from distflow_mc.dag.plan import (
    Fields,
    Plan,
    PlannedNode,
    fingerprint,
    plan_workflow,
    prune,
    unmet_reads,
)
from distflow_mc.dag.spec import NodeSpec, NodeType, Role
from distflow_mc.dag.validate import WorkflowError, validate_workflow

__all__ = [
    "Fields",
    "NodeSpec",
    "NodeType",
    "Plan",
    "PlannedNode",
    "Role",
    "WorkflowError",
    "fingerprint",
    "plan_workflow",
    "prune",
    "unmet_reads",
    "validate_workflow",
]
