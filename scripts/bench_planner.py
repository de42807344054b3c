"""Planner speed: validate + plan + fingerprint random DAGs of 100..5,000 nodes.

    python scripts/bench_planner.py

Prints a table (median of repeats, nodes/s) and writes bench_planner.csv beside it in the
current directory. The target is well under 100 ms for 1,000 nodes.
"""

from __future__ import annotations

import random
import statistics
import time

from bench_common import report
from distflow_mc.dag import NodeSpec, NodeType, Role, fingerprint, plan_workflow


def random_dag(n: int, seed: int, max_deps: int = 4) -> list[NodeSpec]:
    rng = random.Random(seed)
    nodes = [NodeSpec("n0", NodeType.MODEL_INFERENCE, Role.ROLLOUT)]
    for i in range(1, n):
        deps = rng.sample(range(i), min(i, rng.randint(1, max_deps)))
        nodes.append(NodeSpec(f"n{i}", NodeType.COMPUTE, Role.REWARD, [f"n{d}" for d in deps]))
    rng.shuffle(nodes)
    return nodes


def main() -> None:
    rows = []
    for n in (100, 1000, 5000):
        nodes = random_dag(n, seed=n)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            plan = plan_workflow(nodes)
            fingerprint(plan, {})
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append(
            {
                "nodes": n,
                "edges": sum(len(x.deps) for x in nodes),
                "stages": len(plan.stages),
                "median_ms": round(median * 1e3, 2),
                "nodes_per_s": round(n / median),
                "ratio_to_100ms_budget": round(median / 0.1, 3),
            }
        )
    report(rows, "bench_planner.csv", width=21)


if __name__ == "__main__":
    main()
