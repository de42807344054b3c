"""ROLLOUT and REWARD nodes: generate on the rollout layout's emitters, score locally."""

from __future__ import annotations

import torch

from distflow_mc.data.batch import Batch
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.stages.workers import Workers


def generate(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    """n samples per prompt of this rank's share, as prompt+response sequences with a
    response mask and the engine's log-probs (token-aligned, 0 on prompt tokens)."""
    if not w.is_rollout_emitter:
        return None
    r = w.config.rollout
    got = w.loader.next()
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
        seed=(w.config.trainer.seed * 1_000_003 + step) * 4099 + w.rollout_rank,
    )
    ids = [prompts.token_slice("input_ids", i) for i in range(len(prompts))]
    gen = w.engine.generate([p.tolist() for p in ids], params)
    tokens: dict[str, list[torch.Tensor]] = {
        "input_ids": [],
        "response_mask": [],
        "rollout_logprobs": [],
    }
    for p, resp, logp in zip(gen.prompt_index, gen.response_ids, gen.logprobs, strict=True):
        tokens["input_ids"].append(torch.cat([ids[p], resp]))
        tokens["response_mask"].append(torch.cat([torch.zeros(len(ids[p])), torch.ones(len(resp))]))
        tokens["rollout_logprobs"].append(torch.cat([torch.zeros(len(ids[p])), logp.float()]))
    index = torch.tensor(gen.prompt_index)
    prompt_uid = prompts.samples["uid"][index]
    sample = torch.arange(len(index)) % r.n
    objects = {
        k: [prompts.objects[k][p] for p in gen.prompt_index]
        for k in ("data_source", "ground_truth", "extra_info")
    }
    objects["finish_reason"] = gen.finish_reasons
    samples = {"uid": prompt_uid * r.n + sample, "group": prompt_uid}
    return Batch.from_sequences(tokens, samples, objects)


def reward(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    if batch is None:
        return None
    mask = batch.tokens["response_mask"].bool()
    responses = [
        w.tokenizer.decode(
            batch.token_slice("input_ids", i)[mask[batch.offsets[i] : batch.offsets[i + 1]]],
            skip_special_tokens=True,
        )
        for i in range(len(batch))
    ]
    scores = w.rewards(
        responses,
        batch.objects["data_source"],
        batch.objects["ground_truth"],
        batch.objects["extra_info"],
    )
    batch.samples["reward"] = torch.tensor(scores.rewards, dtype=torch.float32)
    lengths = [
        float(mask[batch.offsets[i] : batch.offsets[i + 1]].sum()) for i in range(len(batch))
    ]
    m.add("reward/mean", sum(scores.rewards), len(scores.rewards))
    m.add("reward/sq", sum(x * x for x in scores.rewards), len(scores.rewards))
    m.add("reward/errors", scores.errors + scores.timeouts)
    m.add("response/length_mean", sum(lengths), len(lengths))
    m.add(
        "response/clipped_frac",
        sum(f == "length" for f in batch.objects["finish_reason"]),
        len(batch),
    )
    m.add_total("rollout/generated_tokens", sum(lengths))
    m.add_total("rollout/total_tokens", float(batch.num_tokens))
    return batch
