"""Worker for tests/dist/test_rollout.py: weights streamed from a train rank to rollout
ranks of another group (rollout.placement=SEPARATE), on 4 gloo ranks: rank 0 sends, ranks 2
and 3 receive into transformers engines, rank 1 (another train rank) takes no part.

    torchrun --nproc-per-node 4 stream_worker.py --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distflow_mc.parallel.dist import init_distributed
from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.rollout.hf_engine import HFEngine
from distflow_mc.rollout.weight_stream import stream_buckets

SOURCE, ROLLOUT = 0, (2, 3)
PROMPTS = [[5, 17, 33, 2], [9, 9, 9]]


def trained(model_dir: Path) -> torch.nn.Module:
    """The source's model, its weights moved off the checkpoint's (as training would)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def odd_tensors() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and odd sizes: each must land aligned and bit-identical."""
    g = torch.Generator().manual_seed(3)
    return [
        ("a", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("b", torch.randn(5, 7, generator=g)),
        ("c", torch.arange(11, dtype=torch.int64)),
        ("d", torch.randn(1, generator=g).to(torch.float16)),
        ("e", torch.ones(2, 3, dtype=torch.bool)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = init_distributed(timeout_s=60)
    group = dist.new_group([SOURCE, *ROLLOUT], timeout=ctx.timeout)  # every rank calls it
    rank, result = ctx.rank, {}
    if rank == SOURCE:
        model = trained(args.model)
        named = list(model.state_dict().items())
        # small buckets: several, one tensor larger than a bucket on its own
        buckets = [named[i : i + 3] for i in range(0, len(named), 3)]
        for _ in stream_buckets([odd_tensors()[:2], odd_tensors()[2:]], SOURCE, group, ctx.device):
            pass
        for _ in stream_buckets(buckets, SOURCE, group, ctx.device):
            pass
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6, stop_token_ids=())
        engine = HFEngine(args.model, pad_token_id=0, device=ctx.device)
        engine.update_weights([named])
        result["responses"] = [r.tolist() for r in engine.generate(PROMPTS, greedy).response_ids]
    elif rank in ROLLOUT:
        got = [t for b in stream_buckets(None, SOURCE, group, ctx.device) for t in b]
        want = odd_tensors()
        result["odd_exact"] = [n for n, _ in got] == [n for n, _ in want] and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for (_, a), (_, b) in zip(got, want, strict=True)
        )
        engine = HFEngine(args.model, pad_token_id=0, device=ctx.device)
        engine.update_weights(stream_buckets(None, SOURCE, group, ctx.device))
        reference = trained(args.model)  # the same seeded moves: what the source sent
        params = dict(engine.model.named_parameters())
        result["bitwise"] = all(
            torch.equal(params[n], t) for n, t in reference.named_parameters() if n in params
        )
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6, stop_token_ids=())
        result["responses"] = [r.tolist() for r in engine.generate(PROMPTS, greedy).response_ids]
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
