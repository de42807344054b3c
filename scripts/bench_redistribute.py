"""Redistribution on gloo: ours vs a raw all_to_all_single of the same bytes vs the
single-controller pattern (gather everything to one rank, split there, scatter).

    python scripts/bench_redistribute.py            # 2, 4 and 8 ranks

~1k samples, long-tailed lengths 64..4096, the per-token fields an RL step carries (ids,
three log-prob fields, advantages, mask) and per-sample strings. Rollout DP=W sends to
train DP=W/2 x TP=2 (every rank of a TP pair holds its replica's batch, as the trainer
needs). Ours runs with every field (like for like with raw and central: same bytes), by
both patterns, both packings (one all-to-all per round or per field), and with only the
fields the trainer reads (`keep`); its phase split is printed for the automatic choice.
Then rollout DP=W to a pipeline (PP=min(W, 4)): every stage getting every field, against
each stage getting what it reads (the first the tokens, the middle ones none, the last all).
And GRPO-shaped groups (8 samples, prompt:response 4:1): each group's prompt sent once
(`share=True`), sent with every sample (`share=False`), and as the measured choice picks
(the default): the time and the bytes sent. Last, train DP=W/2 x CP=2: each rank of a CP
pair receives only its chunks of its replica's samples (data/chunks.py; with each token's
next one, its label), against the TP pair's whole copies: bytes received per rank, time.
Prints tables last and writes bench_redistribute.csv.
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


def grpo_batch(replica: int, replicas: int):
    """Groups of GROUP samples: a prompt (~4x the response) then a response; every field
    of a group's prompt alike (ids, zero log-probs, mask off)."""
    import torch

    from distflow_mc.data.batch import Batch

    g = torch.Generator().manual_seed(1000 + replica)
    groups = SAMPLES // replicas // GROUP
    prompts = (torch.distributions.LogNormal(6.5, 0.5).sample((groups,)).clamp(64, 3072)).int()
    ids, masks = [], []
    for prompt in prompts.tolist():
        head = torch.randint(0, 150000, (prompt,), generator=g)
        for j in range(GROUP):
            tail = torch.randint(0, 150000, (max(16, prompt // 4 + j * 8),), generator=g)
            ids.append(torch.cat([head, tail]))
            masks.append(torch.arange(len(ids[-1])) >= prompt)
    floats = ("logprobs", "old_logprobs", "ref_logprobs", "advantages")
    tokens = {"input_ids": ids, "response_mask": masks}
    noise = [torch.randn(len(x), generator=g) * m for x, m in zip(ids, masks, strict=True)]
    tokens |= dict.fromkeys(floats, noise)
    uid = torch.arange(len(ids)) + replica * len(ids)
    return Batch.from_sequences(
        tokens, {"uid": uid, "group": uid // GROUP, "reward": torch.rand(len(ids), generator=g)}
    )


def batch_bytes(b) -> int:
    return sum(t.numel() * t.element_size() for t in [*b.tokens.values(), *b.samples.values()])


REPEATS = 15
TRAINER_READS = ("input_ids", "response_mask", "advantages", "old_logprobs")


def interleaved(fns: dict, repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds of each function, run in turns (one call of each per round, between
    barriers), so that the machine's drifting load falls on all of them alike."""
    import torch.distributed as dist

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    from distflow_mc.data import prefixes
    from distflow_mc.data.redistribute import Balance, Packing, Pattern, Transfer, redistribute
    from distflow_mc.parallel.dist import init_distributed
    from distflow_mc.parallel.layout import Layout

    ctx = init_distributed(timeout_s=600)
    w, rank = ctx.world_size, ctx.rank
    src, dst = Layout("rollout", dp=w), Layout("train", dp=w // 2, tp=2, replicated=True)
    mine = make_batch(rank, w)
    own = batch_bytes(mine)
    args = (Balance(), ctx.device, ctx.timeout)
    for _ in range(6):  # AUTO measures each pattern x packing, then keeps the fastest
        received = redistribute(mine, src, dst, *args)
    tokens = [0] * w
    dist.all_gather_object(tokens, received.num_tokens)
    per_replica = tokens[::2]
    total = torch.tensor([own])
    dist.all_reduce(total)
    moved = int(total)
    phases: dict[str, float] = {}

    # raw: one all_to_all_single of the same bytes, preallocated; "direct" delivers what
    # ours delivers (each replica's share to both ranks of the TP pair), "leaders" only to
    # each replica's first rank (the lower bound on bytes)
    replicas = dst.replicas()

    def raw_for(targets: list[list[int]]):
        send = [0] * w
        for i, ranks in enumerate(targets):
            piece = own // len(targets) + (i < own % len(targets))
            for r in ranks:
                send[r] = piece
        sizes: list = [None] * w
        dist.all_gather_object(sizes, send)
        recv = [sizes[s][rank] for s in range(w)]
        inp = torch.zeros(sum(send), dtype=torch.uint8)
        out_buf = torch.empty(sum(recv), dtype=torch.uint8)
        return lambda: dist.all_to_all_single(out_buf, inp, recv, send)

    # single controller: gather every payload to rank 0; rank 0 cuts the batch into the
    # replicas' shares and scatters each rank its replica's share (TP peers get the same).
    # Its sizes are exchanged once, outside the timing: a lower bound on the pattern.
    longest = torch.tensor([own])
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    padded = torch.zeros(int(longest), dtype=torch.uint8)
    share = -(-moved // dst.dp)

    def controller() -> None:
        gathered = [torch.empty_like(padded) for _ in range(w)] if rank == 0 else None
        dist.gather(padded, gathered, dst=0)
        chunks = None
        if rank == 0:
            whole = torch.cat(gathered)  # the driver holds the whole batch
            cut = list(
                torch.nn.functional.pad(whole, (0, share * dst.dp - len(whole))).view(dst.dp, share)
            )
            chunks = [cut[dst.coords(r)["dp"]].clone() for r in range(w)]
        target = torch.empty(share, dtype=torch.uint8)
        dist.scatter(target, chunks, src=0)

    # overlap: the token fields leave while a reward stage (modelled as a wait of 20 ms:
    # scorers run in worker processes) runs; the reward follows
    reward_s = 0.02
    no_reward = mine.only([k for k in mine.names() if k != "reward"])

    def sequential() -> None:
        time.sleep(reward_s)
        redistribute(mine, src, dst, *args)

    def overlapped() -> None:
        transfer = Transfer(src, dst, *args)
        transfer.send(no_reward)
        time.sleep(reward_s)
        transfer.send(mine)
        transfer.finish()

    # a pipeline: each stage gets every field, or only what it reads
    pp = min(w, 4)
    piped = Layout("train", dp=w // pp, pp=pp, replicated=True)
    views = (("input_ids",), *[()] * (pp - 2), None)
    for _ in range(6):  # past AUTO's measuring, for both
        redistribute(mine, src, piped, *args)
        staged = redistribute(mine, src, piped, *args, stages=views)
    full = redistribute(mine, src, piped, *args)
    got: list = [None] * w
    dist.all_gather_object(got, (batch_bytes(full), batch_bytes(staged)))
    # GRPO groups: each prompt sent once, or with every sample
    grpo_batch_ = grpo_batch(rank, w)
    for _ in range(12):  # past the measured choice's first tries
        redistribute(grpo_batch_, src, dst, *args)
    grpo: list = [None] * w
    sent = batch_bytes(prefixes.share(grpo_batch_))
    dist.all_gather_object(grpo, (batch_bytes(grpo_batch_), sent))

    # context parallelism: each rank of a CP pair gets its chunks of its replica's samples
    cp_dst = Layout("train", dp=w // 2, cp=2, replicated=True)
    for _ in range(6):
        chunked = redistribute(mine, src, cp_dst, *args)
    cp_bytes: list = [None] * w
    arrived = chunked.only([k for k in chunked.names() if k != "positions"])  # (made there)
    dist.all_gather_object(cp_bytes, (batch_bytes(received), batch_bytes(arrived)))

    t = interleaved(
        {
            "ours": lambda: redistribute(mine, src, dst, *args, phases=phases),
            "cp2": lambda: redistribute(mine, src, cp_dst, *args),
            **{
                p.value: lambda p=p: redistribute(mine, src, dst, *args, pattern=p)
                for p in (Pattern.DIRECT, Pattern.LEADERS)
            },
            **{
                k.value: lambda k=k: redistribute(mine, src, dst, *args, packing=k)
                for k in (Packing.CHUNKS, Packing.FIELDS)
            },
            "kept_fields": lambda: redistribute(mine, src, dst, *args, keep=TRAINER_READS),
            "pp_all": lambda: redistribute(mine, src, piped, *args),
            "pp_views": lambda: redistribute(mine, src, piped, *args, stages=views),
            "raw_direct": raw_for(replicas),
            "raw_leaders": raw_for([r[:1] for r in replicas]),
            "central": controller,
            "sequential": sequential,
            "overlapped": overlapped,
            "grpo_auto": lambda: redistribute(grpo_batch_, src, dst, *args),
            **{
                f"grpo_share_{x}": lambda x=x: redistribute(grpo_batch_, src, dst, *args, share=x)
                for x in (True, False)
            },
        }
    )
    ours = t["ours"]
    hidden = (t["sequential"] - t["overlapped"]) / (t["sequential"] - reward_s)

    # what the busiest rank holds at once: its batch, the send buffer (DIRECT: one copy per
    # TP peer) and the receive buffer, then the receive buffer and the unpacked batch
    copies = 2 if t["direct"] <= t["leaders"] else 1
    peak_ours = own + max(own * copies, batch_bytes(received)) + batch_bytes(received)
    peak_central = (int(longest) * w * 2 + share * w) if rank == 0 else own + int(longest) + share
    peaks: list = [None] * w
    dist.all_gather_object(peaks, (peak_ours, peak_central))
    if rank == 0:
        mean = sum(per_replica) / len(per_replica)
        ms = {k: v for k, v in t.items() if k not in ("sequential", "overlapped")}
        ms |= {k: v / REPEATS for k, v in phases.items()}
        Path(out).write_text(
            json.dumps(
                {
                    "ranks": w,
                    "samples": SAMPLES,
                    "MB": round(moved / 1e6, 1),
                    "ours_MB_s": round(moved / ours / 1e6, 1),
                    "ours_vs_raw_direct": round(t["raw_direct"] / ours, 2),
                    "ours_vs_raw_leaders": round(t["raw_leaders"] / ours, 2),
                    "central_vs_ours_time": round(t["central"] / ours, 2),
                    **{f"{k}_ms": round(v * 1e3, 1) for k, v in ms.items()},
                    "overlap_hidden": round(hidden, 2),
                    "peak_MB_ours": round(max(p[0] for p in peaks) / 1e6, 1),
                    "peak_MB_central": round(max(p[1] for p in peaks) / 1e6, 1),
                    "peak_ours_over_share": round(max(p[0] for p in peaks) / share, 2),
                    "balance_max_mean": round(max(per_replica) / mean, 4),
                    "pp": pp,
                    "pp_all_MB_per_rank": round(sum(g[0] for g in got) / w / 1e6, 1),
                    "pp_views_MB_per_rank": round(sum(g[1] for g in got) / w / 1e6, 1),
                    "pp_views_vs_all_time": round(t["pp_views"] / t["pp_all"], 2),
                    "grpo_MB": round(sum(g[0] for g in grpo) / 1e6, 1),
                    "grpo_sent_MB": round(sum(g[1] for g in grpo) / 1e6, 1),
                    "grpo_shared_vs_not_time": round(
                        t["grpo_share_True"] / t["grpo_share_False"], 2
                    ),
                    "grpo_auto_vs_not_time": round(t["grpo_auto"] / t["grpo_share_False"], 2),
                    "tp2_MB_per_rank": round(sum(b[0] for b in cp_bytes) / w / 1e6, 1),
                    "cp2_MB_per_rank": round(sum(b[1] for b in cp_bytes) / w / 1e6, 1),
                    "cp2_vs_tp2_time": round(t["cp2"] / ours, 2),
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
    report(rows, "bench_redistribute.csv", width=12)


if __name__ == "__main__":
    main()
