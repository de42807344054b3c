"""The role-free `advantage` node: outcome estimators per group, or GAE with the critic."""

from __future__ import annotations

import torch

from distflow_mc.algos import advantages as adv_fns
from distflow_mc.algos.losses import kl_penalty
from distflow_mc.data.batch import Batch
from distflow_mc.data.microbatch import pad_microbatch
from distflow_mc.observability.metrics import Metrics
from distflow_mc.stages.workers import Workers


def compute(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    if not w.reads_all:  # an earlier pipeline stage: only the losses' stage reads advantages
        return batch
    a = w.config.algo
    n = len(batch)
    mask = batch.tokens["response_mask"]
    owner = batch.token_owner()
    kl_tok = torch.zeros_like(mask)
    if a.kl_in_reward and "ref_logprobs" in batch.tokens:
        kl_tok = (
            kl_penalty(
                batch.tokens["old_logprobs"], batch.tokens["ref_logprobs"], a.kl_estimator.name
            )
            * mask
        )
        if w.mp.emits_data:
            m.add("actor/kl_in_reward", float(kl_tok.sum()), float(mask.sum()))
    if w.outcome_advantage is not None:
        kl_seq = mask.new_zeros(n).index_add_(0, owner, kl_tok)
        rewards = batch.samples["reward"] - a.kl_coef * kl_seq
        per_sample = w.outcome_advantage(rewards, batch.samples["group"])
        batch.tokens["advantages"] = per_sample[owner] * mask
        return batch
    dense = pad_microbatch(batch, list(range(n)))
    resp = dense["response_mask"]
    last = (resp.cumsum(1) == resp.sum(1, keepdim=True)) & resp.bool()
    token_rewards = last.float() * batch.samples["reward"][:, None] - a.kl_coef * dense_of(
        batch, kl_tok
    )
    advantages, returns = adv_fns.gae(token_rewards, dense["values"], resp, a.gamma, a.lam)
    real = dense["attention_mask"]
    flat_adv = advantages[real]
    # whitened over the whole batch (all replicas), as PPO defines it
    mean, std = adv_fns.batch_moments(flat_adv[mask.bool()], w.mp.dp_sum)
    batch.tokens["advantages"] = ((flat_adv - mean) / (std + 1e-6)) * mask
    batch.tokens["returns"] = returns[real]
    return batch


def dense_of(batch: Batch, packed: torch.Tensor) -> torch.Tensor:
    probe = Batch(batch.offsets, {"x": packed}, {k: batch.samples[k] for k in ("uid", "group")})
    return pad_microbatch(probe, list(range(len(batch))))["x"]
