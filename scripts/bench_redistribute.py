"""Redistribution on gloo: ours vs a raw all_to_all_single of the same bytes vs the
single-controller pattern (gather everything to one rank, split there, scatter).

    python scripts/bench_redistribute.py            # 2, 4 and 8 ranks

~1k samples, long-tailed lengths 64..4096, the per-token fields an RL step carries (ids,
three log-prob fields, advantages, mask). Rollout DP=W sends to train DP=W/2 x TP=2.
Prints a table last and writes bench_redistribute.csv in the current directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import report

SAMPLES = 1024
GROUP = 8


def make_batch(replica: int, replicas: int):
    import torch

    from distflow_mc.data.batch import Batch

    g = torch.Generator().manual_seed(replica)
    n = SAMPLES // replicas
    # long tail: most responses short, a few near the 4k cap
    lengths = (torch.distributions.LogNormal(6.0, 0.9).sample((n,)).clamp(64, 4096)).int()
    lengths = lengths.tolist()
    uid = torch.arange(n) + replica * n
    floats = ("logprobs", "old_logprobs", "ref_logprobs", "advantages")
    tokens = {"input_ids": [torch.randint(0, 150000, (n_,), generator=g) for n_ in lengths]}
    tokens |= {k: [torch.randn(n_, generator=g) for n_ in lengths] for k in floats}
    tokens["response_mask"] = [torch.ones(n_, dtype=torch.bool) for n_ in lengths]
    return Batch.from_sequences(
        tokens,
        {"uid": uid, "group": uid // GROUP, "reward": torch.rand(n, generator=g)},
        {"data_source": ["gsm8k"] * n},
    )


def batch_bytes(b) -> int:
    return sum(t.numel() * t.element_size() for t in [*b.tokens.values(), *b.samples.values()])


def timed(fn, repeats: int = 5) -> float:
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    from distflow_mc.data.redistribute import Balance, redistribute
    from distflow_mc.parallel.dist import init_distributed
    from distflow_mc.parallel.layout import Layout

    ctx = init_distributed(timeout_s=600)
    w, rank = ctx.world_size, ctx.rank
    src, dst = Layout("rollout", dp=w), Layout("train", dp=w // 2, tp=2, replicated=True)
    mine = make_batch(rank, w)
    own = batch_bytes(mine)
    args = (Balance(), ctx.device, ctx.timeout)
    received = redistribute(mine, src, dst, *args)
    ours = timed(lambda: redistribute(mine, src, dst, *args))
    tokens = [0] * w
    dist.all_gather_object(tokens, received.num_tokens)
    per_replica = tokens[::2]

    # raw: the same bytes per sender, spread over the destination leaders
    payload = torch.zeros(own, dtype=torch.uint8)  # this rank's tensor bytes
    leaders = [r[0] for r in dst.replicas()]
    send = [0] * w
    for i, leader in enumerate(leaders):
        send[leader] = payload.numel() // len(leaders) + (i < payload.numel() % len(leaders))
    sizes = [None] * w
    dist.all_gather_object(sizes, send)
    recv = [sizes[s][rank] for s in range(w)]
    out_buf = torch.empty(sum(recv), dtype=torch.uint8)
    raw = timed(lambda: dist.all_to_all_single(out_buf, payload, recv, send))
    moved = [0]
    total_bytes = torch.tensor([payload.numel()])
    dist.all_reduce(total_bytes)
    moved[0] = int(total_bytes)

    # single controller: gather every payload to rank 0, rank 0 splits, scatters back
    longest = torch.tensor([payload.numel()])
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    padded = torch.zeros(int(longest), dtype=torch.uint8)
    padded[: payload.numel()] = payload
    share = -(-moved[0] // w)

    def controller() -> None:
        gathered = [torch.empty_like(padded) for _ in range(w)] if rank == 0 else None
        dist.gather(padded, gathered, dst=0)
        chunks = None
        if rank == 0:
            whole = torch.cat(gathered)  # the driver holds the whole batch
            chunks = list(whole[: share * w].view(w, share).clone())
        target = torch.empty(share, dtype=torch.uint8)
        dist.scatter(target, chunks, src=0)

    central = timed(controller)
    peak_ours = own + payload.numel() + sum(recv)
    peak_central = (int(longest) * w * 2 + share * w) if rank == 0 else own + int(longest) + share
    peaks = [None] * w
    dist.all_gather_object(peaks, (peak_ours, peak_central))
    if rank == 0:
        mean = sum(per_replica) / len(per_replica)
        Path(out).write_text(
            json.dumps(
                {
                    "ranks": w,
                    "samples": SAMPLES,
                    "MB_moved": round(moved[0] / 1e6, 1),
                    "ours_MB_s": round(moved[0] / ours / 1e6, 1),
                    "raw_a2a_MB_s": round(moved[0] / raw / 1e6, 1),
                    "ours_vs_raw": round(raw / ours, 2),
                    "central_vs_ours_time": round(central / ours, 2),
                    "peak_MB_ours": round(max(p[0] for p in peaks) / 1e6, 1),
                    "peak_MB_central": round(max(p[1] for p in peaks) / 1e6, 1),
                    "balance_max_mean": round(max(per_replica) / mean, 4),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default="")
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows = []
    for w in args.ranks:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [torchrun, "--standalone", f"--nproc-per-node={w}", __file__, "--worker", f.name]
            subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
            rows.append(json.loads(Path(f.name).read_text()))
    report(rows, "bench_redistribute.csv", width=20)


if __name__ == "__main__":
    main()
