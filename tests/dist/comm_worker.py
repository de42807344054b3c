"""Known collectives under CommCounter on every rank; each rank writes its counts per phase
(test_scale.py checks them against a hand count)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from distflow_mc.observability.comm import CommCounter
from distflow_mc.parallel.dist import init_distributed

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ctx = init_distributed(timeout_s=60)
    w, r = ctx.world_size, ctx.rank
    counter = CommCounter()
    with counter.installed():
        with counter.phase("gather"):  # 3 int64 from each rank
            dist.all_gather_into_tensor(torch.empty(3 * w, dtype=torch.int64), torch.ones(3).long())
        with counter.phase("broadcast"):  # 10 float32 from rank 1
            dist.broadcast(torch.zeros(10), src=1)
        with counter.phase("all_to_all"):  # rank r sends j + 1 rows of 2 float32 to rank j
            send = torch.zeros(sum(j + 1 for j in range(w)), 2)
            recv = torch.empty(w * (r + 1), 2)
            dist.all_to_all_single(recv, send, [r + 1] * w, [j + 1 for j in range(w)])
        with counter.phase("objects"):
            dist.all_gather_object([None] * w, {"rank": r, "pad": "x" * r})
        with counter.phase("all_reduce"):  # 5 float64
            dist.all_reduce(torch.ones(5, dtype=torch.float64))
    counts = {phase: asdict(c) for phase, c in counter.by_phase().items()}
    Path(args.out, f"rank{r}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()
