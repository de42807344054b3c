"""Workflow DAG: node spec, validation, deterministic planning and its fingerprint."""

from distflow_mc.dag.plan import Plan, PlannedNode, fingerprint, plan_workflow
from distflow_mc.dag.spec import NodeSpec, NodeType, Role
from distflow_mc.dag.validate import WorkflowError, validate_workflow

__all__ = [
    "NodeSpec",
    "NodeType",
    "Plan",
    "PlannedNode",
    "Role",
    "WorkflowError",
    "fingerprint",
    "plan_workflow",
    "validate_workflow",
]
