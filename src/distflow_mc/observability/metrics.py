"""Step metrics: every rank adds (sum, count) pairs; one all-reduce per step turns them
into global means; rank 0 appends them to a JSONL file."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist


class Metrics:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)  # summed over ranks
        self.local: dict[str, float] = {}  # this rank's own (times, lr): no reduce

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] += float(value)

    def set(self, name: str, value: float) -> None:
        self.local[name] = float(value)

    def reduce(self) -> dict[str, float]:
        """Global means (and totals) over all ranks: one all_gather_object of the names
        (ranks may hold different ones), one all_reduce of the values."""
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, (sorted(self.sums), sorted(self.totals)))
        means = sorted({n for pair in names for n in pair[0]})
        totals = sorted({n for pair in names for n in pair[1]})
        rows = [[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in means]
        rows += [[self.totals.get(n, 0.0), 0.0] for n in totals]
        packed = torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)
        if dist.get_world_size() > 1:
            dist.all_reduce(packed)
        values = packed.tolist()
        out = {n: (s / c if c else float("nan")) for n, (s, c) in zip(means, values, strict=False)}
        out.update({n: s for n, (s, _) in zip(totals, values[len(means) :], strict=True)})
        return {**out, **self.local}


class JsonlWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
