"""Deterministic planning: depth levels, a linear order, stages, and the plan fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from distflow_mc.dag.spec import NodeSpec, NodeType, Role
from distflow_mc.dag.validate import validate_workflow


@dataclass(frozen=True)
class PlannedNode:
    id: str
    role: Role | None
    type: NodeType
    deps: tuple[str, ...]
    fn: str | None
    depth: int

    def canonical(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role.name if self.role else None,
            "type": self.type.name,
            "deps": list(self.deps),
            "fn": self.fn,
            "depth": self.depth,
        }


@dataclass(frozen=True)
class Plan:
    """Nodes in execution order: by depth, then by id. Equal on every rank by construction."""

    nodes: tuple[PlannedNode, ...]

    @property
    def stages(self) -> tuple[tuple[PlannedNode, ...], ...]:
        """Nodes grouped by depth: a stage's nodes depend only on earlier stages."""
        return tuple(tuple(group) for _, group in groupby(self.nodes, key=lambda n: n.depth))

    def canonical(self) -> list[dict[str, Any]]:
        return [n.canonical() for n in self.nodes]


def _depths(nodes: Sequence[NodeSpec]) -> dict[str, int]:
    """Longest dependency chain to each node (Kahn's algorithm; the graph is acyclic)."""
    pending = {n.id: len(set(n.deps)) for n in nodes}
    users: dict[str, list[str]] = {n.id: [] for n in nodes}
    for n in nodes:
        for dep in set(n.deps):
            users[dep].append(n.id)
    depth = dict.fromkeys(pending, 0)
    ready = [node_id for node_id, count in pending.items() if count == 0]
    while ready:
        node_id = ready.pop()
        for user in users[node_id]:
            depth[user] = max(depth[user], depth[node_id] + 1)
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    return depth


def plan_workflow(nodes: Sequence[NodeSpec], check_fn: bool = True) -> Plan:
    """Validate and plan. A pure function of the node set: the YAML order does not matter."""
    validate_workflow(nodes, check_fn=check_fn)
    depth = _depths(nodes)
    planned = [
        PlannedNode(n.id, n.role, n.type, tuple(sorted(set(n.deps))), n.fn, depth[n.id])
        for n in nodes
    ]
    return Plan(tuple(sorted(planned, key=lambda n: (n.depth, n.id))))


def fingerprint(plan: Plan, config: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical plan and the resolved config (keys sorted)."""
    blob = json.dumps(
        {"plan": plan.canonical(), "config": config},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
