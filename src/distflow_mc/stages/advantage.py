"""The role-free `advantage` node: outcome estimators per group, or GAE with the critic."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from distflow_mc.algos import advantages as adv_fns
from distflow_mc.algos.losses import kl_penalty
from distflow_mc.data.batch import Batch
from distflow_mc.observability.metrics import Metrics
from distflow_mc.stages.workers import Workers


def compute(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    if not w.reads_all:  # an earlier pipeline stage: only the losses' stage reads advantages
        return batch
    a = w.config.algo
    n = len(batch)
    mask = batch.tokens["response_mask"]
    owner = batch.token_owner()
    # context parallelism: each rank holds its chunks of every sample (data/chunks.py)
    cp = parallel_state.get_context_parallel_group() if w.mp.cp > 1 else None
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
        if cp is not None:  # each sample's sum over its chunks
            dist.all_reduce(kl_seq, group=cp)
        rewards = batch.samples["reward"] - a.kl_coef * kl_seq
        per_sample = w.outcome_advantage(rewards, batch.samples["group"])
        batch.tokens["advantages"] = per_sample[owner] * mask
        return batch
    resp, values, kl, where = response_rows(batch, [batch.tokens["values"], kl_tok], cp)
    last = (resp.cumsum(1) == resp.sum(1, keepdim=True)) & resp.bool()
    token_rewards = last.float() * batch.samples["reward"][:, None] - a.kl_coef * kl
    advantages, returns = adv_fns.gae(token_rewards, values, resp, a.gamma, a.lam)
    # whitened over the whole batch (all replicas), as PPO defines it
    mean, std = adv_fns.batch_moments(advantages[resp.bool()], w.mp.dp_sum)
    batch.tokens["advantages"] = ((advantages.flatten()[where] - mean) / (std + 1e-6)) * mask
    batch.tokens["returns"] = returns.flatten()[where] * mask
    return batch


def response_rows(
    batch: Batch, fields: list[torch.Tensor], cp: dist.ProcessGroup | None
) -> tuple[torch.Tensor, ...]:
    """[n, s] rows of the response mask and of per-token `fields`, each sample's response
    tokens at their positions (under context parallelism from every rank's chunks, gathered
    over `cp`), and where each of the batch's own tokens sits in the flattened rows (only
    its response tokens' places are meaningful)."""
    mask = batch.tokens["response_mask"]
    owner = batch.token_owner()
    if "positions" in batch.tokens:  # a CP rank's chunks: their true positions
        positions = batch.tokens["positions"]
    else:
        positions = torch.arange(batch.num_tokens, device=owner.device) - batch.offsets[owner]
    values = torch.stack([mask.float(), *(f.float() for f in fields)])
    every_owner, every_position = owner, positions
    if cp is not None:  # (every rank's chunks are laid out alike: the same owners)
        size = dist.get_world_size(cp)
        parts = [torch.empty_like(values) for _ in range(size)]
        dist.all_gather(parts, values.contiguous(), group=cp)
        at = [torch.empty_like(positions) for _ in range(size)]
        dist.all_gather(at, positions.contiguous(), group=cp)
        values, every_position = torch.cat(parts, dim=1), torch.cat(at)
        every_owner = owner.repeat(size)
    real = values[0].bool()
    s = int(every_position[real].max()) + 1 if bool(real.any()) else 1
    rows = values.new_zeros(len(values), len(batch), s)
    rows[:, every_owner[real], every_position[real]] = values[:, real]
    where = owner * s + positions.clamp(max=s - 1)
    return (*rows, where)
