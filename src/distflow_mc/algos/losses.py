"""Policy and value losses, KL estimators, entropy bonus, aggregation.

Every loss returns (numerator, denominator) so that megatron can divide the gradients by
the denominator summed over all micro-batches and data-parallel ranks: the aggregation is
then exact for the global batch, not an average of per-micro-batch averages.
Tensors are right-padded [B, T] over response tokens with a 0/1 `mask`; a row is one
sequence, or, given `segments` [B, T] (packed rows: each token's sequence, counted over
the micro-batch), several. Under context parallelism (`group`: each rank of the CP group
holds part of every row) what a per-sequence rule needs of the whole sequence (its token
count, GSPO's ratio) is summed over the group; the numerators stay each rank's own, and
megatron sums them (and the denominators) over the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Pair = tuple[torch.Tensor, torch.Tensor]


def per_sequence(
    x: torch.Tensor, segments: torch.Tensor | None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sums of [B, T] `x` per sequence: per row, or per segment of packed rows (as many
    entries as tokens, the unused ones 0); with `group`, of the whole sequences (summed
    over the CP group: no gradient)."""
    if segments is None:
        out = x.sum(-1)
    else:
        out = x.new_zeros(segments.numel()).index_add_(0, segments.flatten(), x.flatten())
    if group is not None:
        out = out.detach().clone()
        dist.all_reduce(out, group=group)
    return out


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    segments: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Pair:
    """TOKEN_MEAN: sum / tokens. SEQ_MEAN_TOKEN_SUM: per-sequence sums, mean over
    sequences (Dr. GRPO's choice). SEQ_MEAN_TOKEN_MEAN: per-sequence means, mean over
    sequences (the original GRPO). With a CP `group`, a sequence's tokens are counted over
    the group and it is counted once, by the group's first rank."""
    mask = mask.to(per_token.dtype)
    if mode == "TOKEN_MEAN":
        return (per_token * mask).sum(), mask.sum()
    sums = per_sequence(per_token * mask, segments)
    tokens = per_sequence(mask, segments, group)
    sequences = (tokens > 0).sum().to(per_token.dtype)  # padding rows are no sequences
    if group is not None and dist.get_rank(group) != 0:
        sequences = sequences * 0
    if mode == "SEQ_MEAN_TOKEN_SUM":
        return sums.sum(), sequences
    if mode == "SEQ_MEAN_TOKEN_MEAN":
        return (sums / tokens.clamp(min=1)).sum(), sequences
    raise ValueError(f"unknown aggregation '{mode}'")


def ppo_clip(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), per token, with
    asymmetric bounds [1 - clip_low, 1 + clip_high] (DAPO's clip-higher, Yu et al. 2025,
    arXiv 2503.14476) and optional dual clip for negative advantages (Ye et al. 2020,
    arXiv 1912.09729): the loss is capped at -dual_clip * A. Returns (loss, clipped)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        cap = -advantages * dual_clip
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    return loss, was_clipped


def gspo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    segments: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): the importance ratio is per sequence,
    s = exp(mean_t(logp - old_logp)), clipped around 1; its token form
    sg[s] * exp(logp_t - sg[logp_t]) carries the gradient to every token. Per-token loss
    (aggregate with SEQ_MEAN_TOKEN_MEAN) and clipped flags."""
    mask = mask.to(logp.dtype)
    log_ratio = per_sequence((logp - old_logp).detach() * mask, segments, group)
    seq = log_ratio / per_sequence(mask, segments, group).clamp(1)
    per_token = seq[:, None] if segments is None else seq[segments]
    token_log_ratio = per_token.detach() + logp - logp.detach()
    ratio = torch.exp(token_log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman 2020,
    "Approximating KL divergence"): K1 log r, K2 (log r)^2 / 2, K3 (r' - 1) - log r'
    with r' = ref / pi (unbiased, low variance, always >= 0)."""
    log_ratio = logp - ref_logp
    if kind == "K1":
        return log_ratio
    if kind == "K2":
        return 0.5 * log_ratio**2
    if kind == "K3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}'")


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss
