"""Long sequences under context parallelism: the training step of bench_packing's small model
on one sequence of 2K-32K tokens at parallel.cp = 1, 2, 4 (gloo ranks on this machine).

    python scripts/bench_long_context.py
    python scripts/bench_long_context.py --lengths 8192 32768 --cp 1 4
    python scripts/bench_long_context.py --recompute none full selective   # trainer.recompute
    python scripts/bench_long_context.py --size qwen0.5b --dtype bf16 --cp 1   # one GPU
    python scripts/bench_long_context.py --samples 8   # one row packing 8 sequences

One launch per (CP, length): a single sequence (its last 3/4 the "response"; with
`--samples N`, N sequences of length / N packed into the row), one optimizer
step (forward and backward through the trainer's own schedule and CP view) after a warm-up
step, medians of `--repeats`. Memory is each rank's peak resident set during the steps above what
it held before the first one (the process's high-water mark, getrusage(RUSAGE_SELF)
.ru_maxrss, read before and after: the whole process, allocator slack included, so an upper
bound on a step's activations); on a GPU, torch's peak allocated memory during the steps
above what was allocated before them. The most of any rank is reported. `--size` takes
bench_model.py's shapes (qwen0.5b: Qwen2.5-0.5B's, random weights) instead of the
4M-parameter model (4m, the default).
Prints tokens/s and peak MB per rank; writes bench_long_context.csv.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import report
from bench_model import SIZES, arch_of
from bench_packing import SIZE, small_arch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (Linux: KB)


def worker(
    out: str, length: int, repeats: int, recompute: str, size: str, dtype: str, samples: int
) -> None:
    import os

    import torch
    import torch.distributed as dist

    from distflow_mc.config.schema import OptimConfig, ParallelConfig
    from distflow_mc.data.batch import Batch
    from distflow_mc.data.chunks import cut
    from distflow_mc.data.microbatch import Item, packed_microbatch
    from distflow_mc.models.gpt import build_gpt
    from distflow_mc.models.train import TrainableModel
    from distflow_mc.parallel.dist import init_distributed
    from distflow_mc.parallel.megatron_state import init_model_parallel
    from distflow_mc.stages.passes import token_logprobs

    ctx = init_distributed(timeout_s=1800)
    cp = int(os.environ["WORLD_SIZE"])
    mp = init_model_parallel(ParallelConfig(cp=cp), seed=1)
    room = length + 8 * cp
    s, arch = (SIZE, small_arch(room)) if size == "4m" else (SIZES[size], arch_of(size, room))
    torch.manual_seed(1)
    granularity = None if recompute == "none" else recompute
    chunks = build_gpt(arch, mp, getattr(torch, dtype), recompute=granularity)
    model = TrainableModel(chunks, OptimConfig(lr=1e-5), 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (length,), generator=g).to(ctx.device)
    each = length // samples
    mask = (torch.arange(each) >= each // 4).float().to(ctx.device)
    uid = torch.arange(samples, device=ctx.device)
    batch = Batch.from_sequences(
        {"input_ids": list(ids.split(each))[:samples], "response_mask": [mask] * samples},
        {"uid": uid, "group": uid},
    )
    row = [[Item((i,)) for i in range(samples)]]  # (several: trainer.sequence_packing's)
    if cp > 1:  # this rank's chunks of every sample (data/chunks.py)
        batch = cut(batch, cp, ctx.rank)
    mbs = [packed_microbatch(batch, row, 0, spans=cp > 1)[0]]

    def loss_fn(mb, out):
        logp, _ = token_logprobs(out, mb, 1.0, s["vocab"])
        m = mb["response_mask"]
        return -(logp * m).sum(), m.sum().to(torch.int), {}

    gpu = ctx.device.type == "cuda"
    before = torch.cuda.memory_allocated() / 2**20 if gpu else rss_mb()  # (RSS: high-water)
    model.step(mbs, loss_fn)  # warm-up
    times = []
    for _ in range(repeats):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.step(mbs, loss_fn)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else rss_mb()
    mine = {"seconds": statistics.median(times), "peak_mb": peak - before, "rss_mb": rss_mb()}
    every: list = [None] * cp
    dist.all_gather_object(every, mine)
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(every))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default="")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--recompute", nargs="+", default=["none"], choices=["none", "full", "selective"]
    )
    parser.add_argument("--size", default="4m", choices=["4m", *SIZES])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--length", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        recompute = args.recompute[0]
        worker(
            args.worker, args.length, args.repeats, recompute, args.size, args.dtype, args.samples
        )
        return
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows = []
    runs = [(n, cp, r) for n in args.lengths for cp in args.cp for r in args.recompute]
    for length, cp, recompute in runs:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [torchrun, "--standalone", f"--nproc-per-node={cp}", __file__]
            cmd += ["--worker", f.name, "--length", str(length), "--repeats", str(args.repeats)]
            cmd += ["--recompute", str(recompute), "--size", args.size, "--dtype", args.dtype]
            cmd += ["--samples", str(args.samples)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
            every = json.loads(Path(f.name).read_text())
        seconds = max(r["seconds"] for r in every)
        row = {
            "size": args.size,
            "tokens": length,
            "samples": args.samples,
            "cp": cp,
            "recompute": recompute,
            "s_per_step": round(seconds, 2),
            "tokens_per_s": round(length / seconds),
            "peak_step_mb_per_rank": round(max(r["peak_mb"] for r in every)),
            "rss_mb_per_rank": round(max(r["rss_mb"] for r in every)),
        }
        rows.append(row)
        print(row, flush=True)
    report(rows, "bench_long_context.csv", width=12)


if __name__ == "__main__":
    main()
