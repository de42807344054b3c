"""Padding of right-padded micro-batches: our length-sorted split vs the token-balanced one
(Karmarkar-Karp on real tokens, as the splitter did before) on the same samples.

    python scripts/bench_microbatch.py

Long-tailed response lengths (log-normal, 64..4096, as RL rollouts are) for a rank's share
of a batch, several token budgets. Prints the padding fraction (padded slots that hold no
token), micro-batch counts, and the slots each needs; writes bench_microbatch.csv.
"""

from __future__ import annotations

import math

import numpy as np

from bench_common import report
from distflow_mc.data.balance import karmarkar_karp
from distflow_mc.data.microbatch import padded_size, split_by_token_budget


def balanced(lengths: list[int], budget: int) -> list[list[int]]:
    """Token-balanced micro-batches: as few as fit the real tokens, Karmarkar-Karp."""
    count = max(1, math.ceil(sum(lengths) / budget))
    while True:
        parts = [p for p in karmarkar_karp(lengths, count) if p]
        if count >= len(lengths) or all(sum(lengths[i] for i in p) <= budget for p in parts):
            return parts
        count += 1


def main() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 0.9, 512), 64, 4096).astype(int).tolist()
    rows = []
    for budget in (4096, 8192, 16384, 32768):
        ours = split_by_token_budget(lengths, budget)
        ref = balanced(lengths, budget)
        slots = {
            k: sum(padded_size(p, lengths) for p in v) for k, v in (("ours", ours), ("ref", ref))
        }
        rows.append(
            {
                "budget": budget,
                "samples": len(lengths),
                "tokens": sum(lengths),
                "sorted_microbatches": len(ours),
                "balanced_microbatches": len(ref),
                "sorted_padding": round(1 - sum(lengths) / slots["ours"], 3),
                "balanced_padding": round(1 - sum(lengths) / slots["ref"], 3),
                "balanced_over_sorted_slots": round(slots["ref"] / slots["ours"], 2),
                "balanced_max_padded": max(padded_size(p, lengths) for p in ref),
            }
        )
    report(rows, "bench_microbatch.csv", width=10)


if __name__ == "__main__":
    main()
