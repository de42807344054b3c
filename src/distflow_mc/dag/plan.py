"""Deterministic planning: depth levels, a linear order, stages, and the plan fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
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
class Fields:
    """The batch fields a node's function reads and writes (in this configuration)."""

    reads: frozenset[str]
    writes: frozenset[str]
    unread_because: str = ""  # why nothing may read the writes here (shown when dropped)


@dataclass(frozen=True)
class Plan:
    """Nodes in execution order: by depth, then by id. Equal on every rank by construction.
    `dropped`: (node id, reason) for the nodes liveness removed."""

    nodes: tuple[PlannedNode, ...]
    dropped: tuple[tuple[str, str], ...] = ()

    @property
    def stages(self) -> tuple[tuple[PlannedNode, ...], ...]:
        """Nodes grouped by depth: a stage's nodes depend only on earlier stages."""
        return tuple(tuple(group) for _, group in groupby(self.nodes, key=lambda n: n.depth))

    def canonical(self) -> list[dict[str, Any]]:
        return [n.canonical() for n in self.nodes] + [{"dropped": list(d)} for d in self.dropped]


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


def prune(plan: Plan, fields: Callable[[PlannedNode], Fields | None]) -> Plan:
    """Drop the nodes whose outputs nothing reads. MODEL_TRAIN nodes are what a step is for;
    a node with its own `fn` (fields None: it may read and write anything) is never
    dropped and keeps everything before it alive. Walks the order backwards, so a node
    that only fed a dropped node goes too."""
    declared = {n.id: fields(n) for n in plan.nodes}
    everything = frozenset(f for d in declared.values() if d for f in d.writes)
    live: set[str] = set()
    kept, dropped = [], []
    for node in reversed(plan.nodes):
        f = declared[node.id]
        if f is None or node.type is NodeType.MODEL_TRAIN or f.writes & live:
            kept.append(node)
            live |= everything if f is None else f.reads
        else:
            unread = ", ".join(sorted(f.writes))
            because = f" ({f.unread_because})" if f.unread_because else ""
            dropped.append((node.id, f"nothing reads its {unread}{because}"))
    return Plan(tuple(reversed(kept)), tuple(reversed(dropped)))


def unmet_reads(
    plan: Plan, fields: Callable[[PlannedNode], Fields | None]
) -> list[tuple[str, str]]:
    """(node id, field) for each field a node reads that none of the nodes it depends on
    (directly or not) writes; nothing is unmet below a node with its own `fn` (it may write
    anything). On the whole planned workflow, before `prune` (which keeps every writer of
    what some node reads)."""
    written: dict[str, frozenset[str] | None] = {}  # per node: what it and its ancestors write
    unmet = []
    for node in plan.nodes:  # (ancestors come first)
        before = [written[d] for d in node.deps]
        f = fields(node)
        if f is None or any(w is None for w in before):
            written[node.id] = None
            continue
        have = frozenset().union(*before)
        unmet += [(node.id, field) for field in sorted(f.reads - have)]
        written[node.id] = have | f.writes
    return unmet


def fingerprint(plan: Plan, config: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical plan and the resolved config (keys sorted)."""
    blob = json.dumps(
        {"plan": plan.canonical(), "config": config},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
