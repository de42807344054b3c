"""Worker for tests/dist/test_rollout.py: train the Megatron actor one step (TP=2), sync its
weights into a transformers engine on every rank (rollout TP=1), and compare greedy
decodes and log-probs.

    torchrun --nproc-per-node 2 rollout_worker.py --model DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distflow_mc.checkpoint.hf_export import save_hf
from distflow_mc.config.schema import OptimConfig, ParallelConfig, RolloutConfig
from distflow_mc.models.factory import load_model
from distflow_mc.models.logprobs import vocab_parallel_logprobs
from distflow_mc.models.train import TrainableModel
from distflow_mc.parallel.dist import init_distributed
from distflow_mc.parallel.layout import Layout
from distflow_mc.parallel.megatron_state import init_model_parallel
from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.rollout.factory import make_engine
from distflow_mc.rollout.guard import logprob_gap
from distflow_mc.rollout.weight_sync import sync_weights

PROMPTS = [[5, 17, 33, 2], [9, 9, 9], [40, 41, 42, 43, 44, 45, 46]]
NEW = 8


def full_logits(out: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(out) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def actor_greedy(model: TrainableModel, prompt: list[int]) -> list[int]:
    """Greedy decode by full forward passes of the Megatron actor (no cache: tiny model)."""
    tokens = list(prompt)
    for _ in range(NEW):
        mb = {"input_ids": torch.tensor([tokens])}
        (logits,) = model.forward([mb], lambda mb, out: full_logits(out)[0, -1])
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


def actor_logprobs(model: TrainableModel, prompt: list[int], response: list[int], t: float):
    ids = torch.tensor([prompt + response])
    mb = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
    (logp,) = model.forward(
        [mb], lambda mb, out: vocab_parallel_logprobs(out, mb["labels"], temperature=t)[0]
    )
    return logp[0, len(prompt) - 1 : -1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_distributed(timeout_s=60)
    mp = init_model_parallel(ParallelConfig(tp=2, timeout_s=60), seed=1)
    arch, chunks = load_model(args.model, mp, torch.float32)
    model = TrainableModel(chunks, OptimConfig(lr=5e-2), total_steps=10)
    engine = make_engine(
        RolloutConfig(), args.model, Layout("rollout", dp=2), 0, 1, torch.device("cpu")
    )
    assert engine is not None
    sync_weights(model.modules, arch, mp, engine, bucket_bytes=32 << 10)
    before = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=NEW))

    ids = torch.tensor([PROMPTS[2] * 3])  # a large step, so greedy outputs change
    mb = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}

    def loss_fn(mb, out):
        logp, _ = vocab_parallel_logprobs(out, mb["labels"])
        return -logp.sum(), torch.tensor(logp.numel(), dtype=torch.int), {}

    model.step([mb], loss_fn)
    sync_weights(model.modules, arch, mp, engine, bucket_bytes=32 << 10)
    after = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=NEW))
    sampled = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.8, max_new_tokens=NEW))
    engine_after = [r.tolist() for r in after.response_ids]
    actor_after = [actor_greedy(model, p) for p in PROMPTS]
    gaps = []
    for i, resp in enumerate(sampled.response_ids):
        ref = actor_logprobs(model, PROMPTS[sampled.prompt_index[i]], resp.tolist(), 0.8)
        gaps.append(logprob_gap(sampled.logprobs[i], ref, torch.ones_like(ref)))
    exported = save_hf(model.modules, arch, mp, args.model, args.out / "hf")
    ids = torch.tensor([PROMPTS[2]])
    (actor_logits,) = model.forward([{"input_ids": ids}], lambda mb, out: full_logits(out))
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(ids).logits
    result = {
        "export_logits_maxdiff": (hf_logits - actor_logits).abs().max().item(),
        "export_files": sorted(p.name for p in exported.iterdir()),
        "engine_equals_actor": engine_after == actor_after,
        "changed_by_training": engine_after != [r.tolist() for r in before.response_ids],
        "gap_mean": max(float(g["sum"] / g["tokens"]) for g in gaps),
        "gap_max": max(float(g["max"]) for g in gaps),
        "engine": engine_after,
        "actor": actor_after,
    }
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
