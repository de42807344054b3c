"""Workflow validation: every problem found is reported, one line each, naming the nodes."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from distflow_mc.dag.spec import ALLOWED_TYPES, BUILTIN_COMPUTE_IDS, NodeSpec, NodeType, Role


class WorkflowError(ValueError):
    """A workflow (`algo.workflow`) that cannot be planned. `problems` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid algo.workflow ({len(self.problems)} problem(s)):\n{lines}")


def import_fn(path: str) -> Callable:
    """Import `package.module.function`; ValueError says why it failed."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"'{path}' is not a dotted path 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"module '{module_name}' does not import: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise ValueError(f"'{path}' is not callable")
    return fn


def find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a] following dependency edges, or None. Iterative DFS."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(deps, white)
    for root in sorted(deps):
        if color[root] != white:
            continue
        stack = [(root, iter(sorted(deps[root])))]
        path = [root]
        color[root] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = black
                stack.pop()
                path.pop()
            elif color.get(child) == grey:
                return [*path[path.index(child) :], child]
            elif color.get(child) == white:
                color[child] = grey
                stack.append((child, iter(sorted(deps[child]))))
                path.append(child)
    return None


def _node_problems(node: NodeSpec, known: set[str], check_fn: bool) -> list[str]:
    problems = []
    role_name = node.role.name if node.role else "none (role-free)"
    allowed = ALLOWED_TYPES[node.role]
    if node.type not in allowed:
        names = ", ".join(sorted(t.name for t in allowed))
        problems.append(
            f"node '{node.id}': role {role_name} cannot run type {node.type.name}"
            f" (allowed: {names})"
        )
    for dep in node.deps:
        if dep not in known:
            problems.append(
                f"node '{node.id}' depends on unknown node '{dep}'"
                f" (known: {', '.join(sorted(known))})"
            )
    if node.role is None and node.fn is None and node.id not in BUILTIN_COMPUTE_IDS:
        builtins = ", ".join(sorted(BUILTIN_COMPUTE_IDS))
        problems.append(
            f"node '{node.id}': a role-free COMPUTE node needs `fn` unless its id is built in "
            f"({builtins})"
        )
    if check_fn and node.fn is not None:
        try:
            import_fn(node.fn)
        except ValueError as e:
            problems.append(f"node '{node.id}': fn '{node.fn}' does not import: {e}")
    return problems


def _unreachable(nodes: Sequence[NodeSpec]) -> list[str]:
    """Nodes with no dependency path from a ROLLOUT node: they would never receive data."""
    users: dict[str, list[str]] = {n.id: [] for n in nodes}
    for n in nodes:
        for dep in n.deps:
            users[dep].append(n.id)
    seen = {n.id for n in nodes if n.role is Role.ROLLOUT}
    frontier = list(seen)
    while frontier:
        for user in users[frontier.pop()]:
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return sorted(n.id for n in nodes if n.id not in seen)


def validate_workflow(nodes: Sequence[NodeSpec], check_fn: bool = True) -> None:
    """Raise WorkflowError listing every problem; return None for a plannable workflow.

    Structural problems (duplicates, unknown deps, role/type, fn) are all reported together;
    cycles and reachability are checked once the graph itself is well formed.
    """
    if not nodes:
        raise WorkflowError(["the workflow has no nodes"])
    problems = []
    counts = Counter(n.id for n in nodes)
    for node_id, count in sorted(counts.items()):
        if count > 1:
            positions = ", ".join(str(i) for i, n in enumerate(nodes) if n.id == node_id)
            problems.append(
                f"duplicate node id '{node_id}' ({count} nodes, at positions {positions})"
            )
    known = set(counts)
    for node in nodes:
        problems += _node_problems(node, known, check_fn)
    if not any(n.role is Role.ROLLOUT and n.type is NodeType.MODEL_INFERENCE for n in nodes):
        problems.append("the workflow has no ROLLOUT node: nothing would produce samples")
    if problems:
        raise WorkflowError(problems)

    cycle = find_cycle({n.id: n.deps for n in nodes})
    if cycle:
        raise WorkflowError([f"dependency cycle: {' -> '.join(cycle)}"])
    unreachable = _unreachable(nodes)
    if unreachable:
        raise WorkflowError(
            [
                f"node '{u}' is unreachable: no dependency path leads to it from a ROLLOUT node"
                for u in unreachable
            ]
        )
