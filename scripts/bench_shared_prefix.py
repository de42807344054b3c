"""The shared-prefix training step against the plain one: tokens/s, the activation slots,
and the same gradient, over prompt:response ratios and group sizes.

    python scripts/bench_shared_prefix.py                  # CPU, 1 rank, bench_packing's model
    python scripts/bench_shared_prefix.py --ratios 4:1 --groups 8 --repeats 5

Per (prompt:response, samples per group): GRPO-shaped batches of about `--tokens` tokens
(groups of n samples sharing a prompt, responses of varying length), one optimizer step
of the Megatron actor over the whole batch per call with the trainer's own micro-batching,
trainer.shared_prefix NEVER and ALWAYS in turns from the same weights, medians after a
warm-up round. Prints tokens/s of each and their ratio, the [rows x length] slots each
lays out (what activations scale with; on a GPU also the peak memory), and how far apart
the two first steps' gradient norms and updated parameters are; writes
bench_shared_prefix.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

from bench_common import report
from bench_packing import SIZE, one_rank_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", nargs="+", default=["1:4", "1:1", "4:1", "16:1"])
    parser.add_argument("--groups", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--length", type=int, default=320, help="prompt + response tokens")
    parser.add_argument("--tokens", type=int, default=8192, help="per batch, about")
    parser.add_argument("--budget", type=int, default=8192, help="trainer.micro_batch_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mp, arch = one_rank_model(29518, 4096)
    s = SIZE

    import torch

    from distflow_mc.config.schema import OptimConfig, SharedPrefix
    from distflow_mc.data.batch import Batch
    from distflow_mc.models.gpt import build_gpt
    from distflow_mc.models.train import TrainableModel
    from distflow_mc.stages.passes import microbatches, token_logprobs

    cuda = torch.cuda.is_available()

    def loss_fn(mb, out):
        logp, _ = token_logprobs(out, mb, 1.0, s["vocab"])
        mask = mb["response_mask"]
        return -(logp * mask).sum(), mask.sum().to(torch.int), {}

    rows = []
    for ratio in args.ratios:
        p_part, r_part = (int(x) for x in ratio.split(":"))
        prompt = max(2, args.length * p_part // (p_part + r_part))
        response = max(1, args.length - prompt)
        for n in args.groups:
            g = torch.Generator().manual_seed(n)
            ids, masks, group = [], [], []
            for k in range(max(1, args.tokens // (n * args.length))):
                shared = torch.randint(0, s["vocab"], (prompt,), generator=g)
                for _ in range(n):  # responses of 1/2 to 3/2 the mean length
                    r = int(response * (0.5 + torch.rand(1, generator=g).item()))
                    ids.append(torch.cat([shared, torch.randint(0, s["vocab"], (max(r, 1),))]))
                    masks.append(torch.arange(len(ids[-1])) >= prompt)
                    group.append(k)
            uid = torch.arange(len(ids))
            samples = {"uid": uid, "group": torch.tensor(group)}
            samples["prompt_length"] = torch.full((len(ids),), prompt)
            batch = Batch.from_sequences({"input_ids": ids, "response_mask": masks}, samples)
            layouts, models, times, first = {}, {}, {}, {}
            for mode in (SharedPrefix.NEVER, SharedPrefix.ALWAYS):
                trainer = SimpleNamespace(
                    micro_batch_tokens=args.budget, sequence_packing=False, shared_prefix=mode
                )
                w = SimpleNamespace(
                    config=SimpleNamespace(trainer=trainer),
                    mp=mp,
                    tokenizer=SimpleNamespace(pad_token_id=0),
                )
                layouts[mode] = microbatches(w, batch)[1]
                torch.manual_seed(1)
                model = build_gpt(arch, mp, torch.float32)
                models[mode] = TrainableModel(model, OptimConfig(lr=1e-5), 100)
                times[mode] = []
            peak = {}
            for rnd in range(args.repeats + 1):  # the first round warms up
                for mode, model in models.items():
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    out = model.step(layouts[mode], loss_fn)
                    times[mode].append(time.perf_counter() - start)
                    if rnd == 0:
                        params = [p.detach().clone() for c in model.chunks for p in c.parameters()]
                        first[mode] = (out["grad_norm"], params)
                    if cuda:
                        peak[mode] = torch.cuda.max_memory_allocated() / 2**20
            never, always = SharedPrefix.NEVER, SharedPrefix.ALWAYS
            step = {m: statistics.median(t[1:]) for m, t in times.items()}
            slots = {m: sum(mb["attention_mask"].numel() for mb in layouts[m]) for m in layouts}
            diff = max(
                float((a - b).abs().max())
                for a, b in zip(first[never][1], first[always][1], strict=True)
            )
            row = {
                "prompt:response": ratio,
                "n": n,
                "tokens": batch.num_tokens,
                "plain_tok_s": round(batch.num_tokens / step[never]),
                "shared_tok_s": round(batch.num_tokens / step[always]),
                "speedup": f"{step[never] / step[always]:.2f}x",
                "slots_ratio": f"{slots[always] / slots[never]:.2f}",
                "grad_norm_rel": f"{abs(first[always][0] / first[never][0] - 1):.1e}",
                "param_max_diff": f"{diff:.1e}",
            }
            if cuda:
                row["peak_mib"] = f"{peak[never]:.0f} -> {peak[always]:.0f}"
            rows.append(row)
            print(row, flush=True)
    report(rows, "bench_shared_prefix.csv", width=12)


if __name__ == "__main__":
    main()
