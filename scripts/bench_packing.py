"""Sequence packing vs one sample per row: padding and training throughput of the Megatron
actor on the same long-tailed batch, with the trainer's own micro-batching.

    python scripts/bench_packing.py            # CPU, 1 rank, the small model of bench_model

Long-tailed sample lengths (log-normal, 16..512, as RL rollouts are) split by the token
budget into length-sorted right-padded micro-batches, or packed into rows as long as the
longest sample (`trainer.sequence_packing`). One optimizer step over the whole batch per
call, both layouts in turns, medians. Prints the padding fraction, tokens/s and their
ratio, and checks the two steps agree (loss and gradient norm); writes bench_packing.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

from bench_common import report

SIZE = dict(vocab=4096, hidden=256, inter=704, layers=4, heads=8, kv=4)


def small_arch(max_positions: int):
    """The 4M-parameter architecture (SIZE) with room for `max_positions` tokens."""
    from distflow_mc.models.hf_config import HFArch

    s = SIZE
    return HFArch(
        "Qwen2ForCausalLM",
        *(s["vocab"], s["hidden"], s["inter"], s["layers"], s["heads"], s["kv"]),
        *(s["hidden"] // s["heads"], 1e-6, 1e6, max_positions, True, True),
    )


def one_rank_model(port: int, max_positions: int):
    """A single-rank megatron world (gloo) and the small architecture."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from distflow_mc.config.schema import ParallelConfig
    from distflow_mc.parallel.dist import init_distributed
    from distflow_mc.parallel.megatron_state import init_model_parallel

    init_distributed(timeout_s=600)
    return init_model_parallel(ParallelConfig(), seed=1), small_arch(max_positions)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--budget", type=int, default=8192, help="trainer.micro_batch_tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    mp, arch = one_rank_model(29517, 512)
    s = SIZE

    import numpy as np
    import torch

    from distflow_mc.config.schema import OptimConfig, SharedPrefix
    from distflow_mc.data.batch import Batch
    from distflow_mc.models.gpt import build_gpt
    from distflow_mc.models.logprobs import vocab_parallel_logprobs
    from distflow_mc.models.train import TrainableModel
    from distflow_mc.stages.passes import microbatches

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.5, 0.9, args.samples), 16, 512).astype(int).tolist()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, s["vocab"], (n,), generator=g) for n in lengths]
    masks = [torch.arange(n) >= n // 4 for n in lengths]  # the last 3/4: the "response"
    uid = torch.arange(len(lengths))
    batch = Batch.from_sequences(
        {"input_ids": ids, "response_mask": masks}, {"uid": uid, "group": uid}
    )

    def loss_fn(mb, out):
        logp, _ = vocab_parallel_logprobs(out, mb["input_ids"].roll(-1, dims=1))
        mask = mb["response_mask"].roll(-1, dims=1) & mb["attention_mask"].roll(-1, dims=1)
        return -(logp * mask).sum(), mask.sum().to(torch.int), {}

    layouts, models, times, stats = {}, {}, {}, {}
    for packing in (False, True):
        trainer = SimpleNamespace(
            micro_batch_tokens=args.budget,
            sequence_packing=packing,
            shared_prefix=SharedPrefix.NEVER,
        )
        w = SimpleNamespace(
            config=SimpleNamespace(trainer=trainer),
            mp=mp,
            tokenizer=SimpleNamespace(pad_token_id=0),
        )
        name = "packed" if packing else "rows"
        layouts[name] = microbatches(w, batch)[1]
        torch.manual_seed(1)
        models[name] = TrainableModel(build_gpt(arch, mp, torch.float32), OptimConfig(lr=1e-5), 100)
        times[name] = []
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, model in models.items():
            start = time.perf_counter()
            out = model.step(layouts[name], loss_fn)
            times[name].append(time.perf_counter() - start)
            stats.setdefault(name, []).append(out["grad_norm"])
    tokens = batch.num_tokens
    row = {"samples": len(lengths), "tokens": tokens, "budget": args.budget}
    for name, mbs in layouts.items():
        slots = sum(mb["attention_mask"].numel() for mb in mbs)
        step = statistics.median(times[name][1:])
        row |= {
            f"{name}_microbatches": len(mbs),
            f"{name}_padding": round(1 - tokens / slots, 3),
            f"{name}_s_per_step": round(step, 3),
            f"{name}_tokens_per_s": round(tokens / step, 1),
        }
    row["packed_vs_rows_tokens_per_s"] = round(
        row["packed_tokens_per_s"] / row["rows_tokens_per_s"], 2
    )
    first = stats["rows"][0]  # the same weights and data: the first steps agree
    row["grad_norm_rel_diff"] = float(f"{abs(stats['packed'][0] - first) / first:.1e}")
    report([row], "bench_packing.csv", width=12)


if __name__ == "__main__":
    main()
