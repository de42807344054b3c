"""What each rank's data and control path moves per step at 2-32 ranks: the entrypoint's own
collectives, counted (bytes sent and received, calls, seconds) per phase.

    python scripts/bench_scale.py                       # 2, 4, 8, 16, 32 gloo ranks
    python scripts/bench_scale.py --ranks 2 4 --steps 2 # (what CI runs)

Weak scaling, as the DistFlow paper's global batch grows with the nodes: every rank holds
`--samples` samples (long-tailed lengths 64..4096, groups of 8) with the fields a GRPO step
moves from the rollout to the trainer (ids, response mask, engine log-probs, reward). Per
step, the phases and the real functions:

- `agreement` (once, at start-up): the plan/config fingerprint check of every run
  (`check_agreement`, on the composed cpu_tiny_grpo config and its plan);
- `redistribute`: rollout DP=N -> train DP=N/2 x TP=2 (`redistribute`: the metadata
  all-gather, the all-to-all, the TP broadcast);
- `metrics`: a step's metrics (60 names) reduced over all ranks (`Metrics.reduce`);
- `weights`: the SEPARATE weight channel, one `--model-mb` version from the first rank to
  the engines of a rollout group of N/2 ranks, in 4 MB buckets (`stream_buckets`).

The redistribution's automatic choice of pattern settles in warm-up steps before counting.
Bytes count direct delivery (observability/comm.py): exact, whatever the backend's
algorithm; seconds on this oversubscribed 2-core machine only calibrate. Writes one row per
ranks x phase x collective (per rank per step: calls, bytes sent and received, the most of
any rank and the mean; seconds, the most of any rank) to bench_scale.csv, which
scripts/scale_model.py reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import report

GROUP = 8
METRIC_NAMES = 60
WARMUP = 6


def make_batch(rank: int, samples: int):
    import torch

    from distflow_mc.data.batch import Batch

    g = torch.Generator().manual_seed(rank)
    lengths = torch.distributions.LogNormal(6.0, 0.9).sample((samples,)).clamp(64, 4096).int()
    lengths = lengths.tolist()
    uid = torch.arange(samples) + rank * samples
    tokens = {
        "input_ids": [torch.randint(0, 150000, (n,), generator=g) for n in lengths],
        "response_mask": [torch.ones(n) for n in lengths],
        "rollout_logprobs": [torch.randn(n, generator=g) for n in lengths],
    }
    samples_ = {"uid": uid, "group": uid // GROUP, "reward": torch.rand(samples, generator=g)}
    return Batch.from_sequences(tokens, samples_)


def agreement_inputs() -> tuple[str, dict]:
    """The fingerprint and payload main.py checks, for the embedded GRPO config."""
    from hydra import compose, initialize_config_dir

    from distflow_mc.config import (
        canonical_config,
        load_config,
        register_resolvers,
        register_schemas,
    )
    from distflow_mc.dag import plan_workflow
    from distflow_mc.dag.plan import fingerprint, prune
    from distflow_mc.stages.fields import node_fields

    register_schemas()
    register_resolvers()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        config = load_config(compose("config", ["experiment=cpu_tiny_grpo"]))
    plan = prune(plan_workflow(config.algo.workflow), node_fields(config))
    settings = {"config": canonical_config(config), "run_dir": "outputs/bench_scale"}
    return fingerprint(plan, settings), {"plan": plan.canonical(), **settings}


def worker(out: str, samples: int, steps: int, model_mb: int) -> None:
    import torch
    import torch.distributed as dist

    from distflow_mc.data.redistribute import Balance, redistribute
    from distflow_mc.observability.comm import CommCounter
    from distflow_mc.observability.metrics import Metrics
    from distflow_mc.parallel.dist import check_agreement, init_distributed
    from distflow_mc.parallel.layout import Layout
    from distflow_mc.rollout.weight_stream import stream_buckets

    digest, payload = agreement_inputs()
    ctx = init_distributed(timeout_s=1800)
    w, rank = ctx.world_size, ctx.rank
    src = Layout("rollout", dp=w)
    dst = Layout("train", dp=max(1, w // 2), tp=min(2, w), replicated=True)
    engines = [0, *range(w - max(1, w // 2), w)] if w > 1 else [0]
    engines = sorted(set(engines))
    weights = dist.new_group(engines, timeout=ctx.timeout)
    batch = make_batch(rank, samples)
    per_bucket = 4 << 18  # float32 elements in 4 MB
    buckets = [
        [(f"layer{i}.weight", torch.randn(per_bucket))] for i in range(max(1, model_mb // 4))
    ]
    for _ in range(WARMUP):  # the redistribution measures its patterns, then keeps one
        redistribute(batch, src, dst, Balance(), ctx.device, ctx.timeout)
    counter = CommCounter()
    with counter.installed():
        with counter.phase("agreement"):
            check_agreement(digest, payload, ctx)
        for step in range(steps):
            with counter.phase("redistribute"):
                redistribute(batch, src, dst, Balance(), ctx.device, ctx.timeout)
            with counter.phase("metrics"):
                m = Metrics()
                for i in range(METRIC_NAMES):
                    m.add(f"group{i % 6}/metric_{i}", float(i + step), 1.0)
                m.reduce()
            if rank in engines and len(engines) > 1:
                with counter.phase("weights"):
                    for _ in stream_buckets(buckets if rank == 0 else None, 0, weights, ctx.device):
                        pass
    mine = {
        "rows": {f"{p}|{c}": vars(v) for (p, c), v in counter.rows.items()},
        "tokens": batch.num_tokens,
        "samples": len(batch),
    }
    every: list = [None] * w
    dist.all_gather_object(every, mine)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": w, "steps": steps, "every": every}))


def rows_of(result: dict) -> list[dict]:
    w, steps, every = result["ranks"], result["steps"], result["every"]
    keys = sorted({k for r in every for k in r["rows"]})
    tokens = sum(r["tokens"] for r in every) / w
    out = []
    for key in keys:
        phase, collective = key.split("|")
        per = steps if phase != "agreement" else 1
        none = {"calls": 0, "sent": 0, "received": 0, "seconds": 0}
        got = [r["rows"].get(key, none) for r in every]
        out.append(
            {
                "ranks": w,
                "phase": phase,
                "collective": collective,
                "calls": round(max(g["calls"] for g in got) / per, 2),
                "sent_max": round(max(g["sent"] for g in got) / per),
                "received_max": round(max(g["received"] for g in got) / per),
                "received_mean": round(sum(g["received"] for g in got) / w / per),
                "seconds_max": float(f"{max(g['seconds'] for g in got) / per:.3g}"),
                "tokens_per_rank": round(tokens),
                "samples_per_rank": every[0]["samples"],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default="")
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    parser.add_argument("--samples", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model-mb", type=int, default=16)
    parser.add_argument("--csv", default="bench_scale.csv")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.samples, args.steps, args.model_mb)
        return
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows = []
    for w in args.ranks:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [
                torchrun,
                "--standalone",
                f"--nproc-per-node={w}",
                __file__,
                *("--worker", f.name, "--samples", str(args.samples)),
                *("--steps", str(args.steps), "--model-mb", str(args.model_mb)),
            ]
            subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
            rows += rows_of(json.loads(Path(f.name).read_text()))
        print(f"{w} ranks done", flush=True)
    report(rows, args.csv, width=12)


if __name__ == "__main__":
    main()
