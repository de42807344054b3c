"""ROLLOUT and REWARD nodes: generate on the rollout layout's emitters, score locally."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from distflow_mc.algos.dapo import informative_groups, overlong_penalty
from distflow_mc.data.batch import Batch
from distflow_mc.data.loader import PromptBatch
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.engine import Generation, SamplingParams
from distflow_mc.stages.workers import Workers


def generate(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    """n samples per prompt of this rank's share, as prompt+response sequences with a
    response mask and the engine's log-probs (token-aligned, 0 on prompt tokens).

    With `algo.dynamic_sampling` (DAPO), groups whose rewards are all equal are dropped
    and more prompts are drawn until every rank has its share of groups, at most
    `algo.dynamic_sampling_max_rounds` times. Every rank's loader advances in every
    round (the loader state stays one global position), and all ranks agree on another
    round with one all-reduce."""
    a = w.config.algo
    target = w.config.data.batch_size // w.layouts.rollout.dp
    pieces: list[Batch] = []
    have = 0
    for round_ in range(a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1):
        if w.is_rollout_emitter:
            prompts = w.loader.next()
            if have < target:
                got = _sample(w, prompts, m, step, round_)
                if a.dynamic_sampling:
                    got = score(w, got, m)
                    keep = informative_groups(got.samples["reward"], got.samples["group"])
                    got = got.select(keep.nonzero().squeeze(1).tolist())
                pieces.append(got)
                have += len(got) // w.config.rollout.n
        if not a.dynamic_sampling:
            break
        short = torch.tensor([float(w.is_rollout_emitter and have < target)], device="cpu")
        dist.all_reduce(short)
        m.set("rollout/dynamic_rounds", round_ + 1)
        if not short.item():
            break
    if not w.is_rollout_emitter:
        return None
    batch = Batch.concat(pieces)
    keep_samples = min(len(batch), target * w.config.rollout.n)
    m.add("rollout/groups", keep_samples // w.config.rollout.n)
    return batch.select(list(range(keep_samples)))


def _sample(w: Workers, got: PromptBatch, m: Metrics, step: int, round_: int) -> Batch:
    r = w.config.rollout
    m.add("data/malformed_rows", got.malformed)
    m.add("data/overlong_prompts", got.overlong)
    prompts = got.batch
    params = SamplingParams(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=(w.tokenizer.eos_token_id,),
        seed=((w.config.trainer.seed * 1_000_003 + step) * 17 + round_) * 4099 + w.rollout_rank,
    )
    host = [prompts.token_slice("input_ids", i) for i in range(len(prompts))]
    gen = w.engine.generate([p.tolist() for p in host], params)
    return _to_batch(gen, host, prompts, r.n, w.ctx.device)


TOKEN_FIELDS = {
    "input_ids": torch.int64,
    "response_mask": torch.float32,
    "rollout_logprobs": torch.float32,
}
PROMPT_OBJECTS = ("data_source", "ground_truth", "extra_info", "extra")  # from the loader


def _to_batch(
    gen: Generation, prompt_ids: list[torch.Tensor], prompts: Batch, n: int, device: torch.device
) -> Batch:
    """prompt + response sequences with a response mask and the engine's log-probs
    (token-aligned, 0 on prompt tokens), on `device` (the engine's output stays there)."""
    if not gen.response_ids:
        return Batch.empty(TOKEN_FIELDS, (*PROMPT_OBJECTS, "finish_reason"), device)
    ids = [p.to(device) for p in prompt_ids]
    tokens: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_FIELDS}
    for p, resp, logp in zip(gen.prompt_index, gen.response_ids, gen.logprobs, strict=True):
        prompt_zeros = torch.zeros(len(ids[p]), device=device)
        tokens["input_ids"].append(torch.cat([ids[p], resp.to(device)]))
        tokens["response_mask"].append(
            torch.cat([prompt_zeros, torch.ones(len(resp), device=device)])
        )
        tokens["rollout_logprobs"].append(torch.cat([prompt_zeros, logp.to(device).float()]))
    index = torch.tensor(gen.prompt_index, dtype=torch.int64, device=device)
    prompt_uid = prompts.samples["uid"].to(device)[index]
    sample = torch.arange(len(index), device=device) % n
    objects = {k: [prompts.objects[k][p] for p in gen.prompt_index] for k in PROMPT_OBJECTS}
    objects["finish_reason"] = gen.finish_reasons
    samples = {"uid": prompt_uid * n + sample, "group": prompt_uid}
    return Batch.from_sequences(tokens, samples, objects)


def responses(w: Workers, batch: Batch) -> list[str]:
    """Response texts (strings live on the host)."""
    ids = batch.tokens["input_ids"].cpu()
    mask = batch.tokens["response_mask"].bool().cpu()
    offsets = batch.offsets.tolist()
    return [
        w.tokenizer.decode(ids[a:b][mask[a:b]], skip_special_tokens=True)
        for a, b in itertools.pairwise(offsets)
    ]


def score(w: Workers, batch: Batch, m: Metrics) -> Batch:
    """Rewards (plus DAPO's overlong penalty when configured) into samples["reward"]."""
    a = w.config.algo
    o = batch.objects
    scores = w.rewards(responses(w, batch), o["data_source"], o["ground_truth"], o["extra_info"])
    mask = batch.tokens["response_mask"]
    rewards = torch.tensor(scores.rewards, dtype=torch.float32, device=mask.device)
    owner = torch.repeat_interleave(torch.arange(len(batch), device=mask.device), batch.lengths)
    lengths = mask.new_zeros(len(batch)).index_add_(0, owner, mask)
    if a.overlong_buffer:
        max_len = w.config.rollout.max_new_tokens
        rewards = rewards + overlong_penalty(
            lengths, max_len, a.overlong_buffer, a.overlong_penalty
        )
    batch.samples["reward"] = rewards
    m.add("reward/mean", float(rewards.sum()), len(rewards))
    m.add("reward/sq", float((rewards**2).sum()), len(rewards))
    m.add("reward/errors", scores.errors + scores.timeouts)
    m.add("response/length_mean", float(lengths.sum()), len(lengths))
    m.add("response/clipped_frac", sum(f == "length" for f in o["finish_reason"]), len(batch))
    m.add_total("rollout/generated_tokens", float(lengths.sum()))
    m.add_total("rollout/total_tokens", float(batch.num_tokens))
    return batch


def reward(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    """The REWARD node; with dynamic sampling the rollout has scored already."""
    if batch is None or "reward" in batch.samples:
        return batch
    return score(w, batch, m)
