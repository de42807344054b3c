"""Advantage estimators. Outcome estimators take one scalar reward per sample and the
group (prompt) of each sample, and return one advantage per sample, to be broadcast over
its response tokens; GAE works per token with a critic."""

from __future__ import annotations

from collections.abc import Callable

import torch

SumReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks


def _group_stats(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample group mean, unbiased group std, and group size."""
    _, index = torch.unique(groups, return_inverse=True)
    k = int(index.max()) + 1 if len(index) else 0
    count = rewards.new_zeros(k).index_add_(0, index, torch.ones_like(rewards))
    mean = rewards.new_zeros(k).index_add_(0, index, rewards) / count
    sq = rewards.new_zeros(k).index_add_(0, index, (rewards - mean[index]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean[index], std[index], count[index]


def grpo(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, arXiv 2402.03300, eq. 3): (r - mean_group) / (std_group + eps)."""
    mean, std, _ = _group_stats(rewards, groups)
    return (rewards - mean) / (std + eps)


def dr_grpo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): r - mean_group, without the std division
    that biases towards too easy and too hard prompts."""
    mean, _, _ = _group_stats(rewards, groups)
    return rewards - mean


def rloo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): r_i - mean of the other samples of the
    group = n/(n-1) (r_i - mean_group)."""
    mean, _, count = _group_stats(rewards, groups)
    return (rewards - mean) * count / (count - 1).clamp(min=1)


def batch_moments(x: torch.Tensor, reduce: SumReduce | None = None) -> tuple[torch.Tensor, ...]:
    """Mean and unbiased std of `x` over the whole batch: `reduce` sums [sum, sum of
    squares, count] over the ranks that hold the rest of it (data-parallel replicas)."""
    stats = torch.stack([x.sum(), (x * x).sum(), x.new_tensor(float(x.numel()))])
    if reduce is not None:
        stats = reduce(stats)
    total, squares, count = stats
    mean = total / count.clamp(min=1)
    var = (squares - count * mean**2) / (count - 1).clamp(min=1)
    return mean, var.clamp(min=0).sqrt()


def reinforce_pp_baseline(
    rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6, reduce: SumReduce | None = None
) -> torch.Tensor:
    """REINFORCE++ with baseline (Hu 2025, arXiv 2501.03262): subtract the group mean, then
    normalise by the std over the whole batch (not per group; `reduce` sums the moments
    over the replicas that hold the rest of the batch)."""
    centred = dr_grpo(rewards, groups)
    mean, std = batch_moments(centred, reduce)
    return (centred - mean) / (std + eps)


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2015, arXiv 1506.02438) over [B, T] rows whose steps are the
    masked tokens: delta_t = r_t + gamma V_{t'} - V_t, A_t = delta_t + gamma lam A_{t'},
    where t' is the next masked token of the row (V and A zero past the last). Tokens
    between (an agent's tool results) are not steps: the masked tokens are gathered to the
    front of each row, run, and scattered back. Returns (advantages, returns = A + V),
    zero off the mask."""
    keep = mask.bool()
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # masked first, in order
    mask = keep.gather(1, order).to(values.dtype)
    values = values.gather(1, order) * mask
    token_rewards = token_rewards.gather(1, order)
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return _unsort(advantages, order), _unsort(returns, order)


def _unsort(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each row's values back at the positions `order` took them from."""
    return torch.empty_like(x).scatter(1, order, x)


# REINFORCE_PP is bound with its batch-wide reduction when the workers are built.
OUTCOME_ESTIMATORS = {
    "GRPO": grpo,
    "DR_GRPO": dr_grpo,
    "RLOO": rloo,
}
