"""Off-policy correction between the policy that sampled a batch (the behaviour policy: the
rollout engine, whose log-probs travel with every sample) and the trainer's own log-probs of
the batch before the update (the proximal policy).

The decoupled PPO objective (Hilton et al. 2021, arXiv 2110.00641) clips the ratio against
the proximal policy and weights each token's loss by w = pi_prox / pi_behav, detached. Two
ways keep w's variance bounded (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
You Off-Policy RL Training"; "When Speed Kills Stability: Demystifying RL Collapse from
the Training-Inference Mismatch", 2025):
- truncated importance sampling (TIS): w is capped at `tis_cap`;
- masked importance sampling (MIS): tokens whose w lies outside [mis_low, mis_high], or
  whole sequences whose w (the product over their tokens) does, are left out of the loss:
  out of its numerator and its denominator, so they get no gradient and dilute nothing.
Tensors are right-padded [B, T] with a 0/1 `mask`, as in losses.py (`segments` for packed
rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from distflow_mc.algos.losses import per_sequence


@dataclass
class Correction:
    weight: torch.Tensor  # [B, T] per-token loss weight (0 where masked), no gradient
    mask: torch.Tensor  # [B, T] the loss mask with the rejected tokens removed
    ratio: torch.Tensor  # [B, T] w = pi_prox / pi_behav before truncation (0 off the mask)
    truncated: torch.Tensor  # [B, T] bool: kept tokens whose weight the cap lowered
    masked: torch.Tensor  # [B, T] bool: response tokens left out by MIS


def behaviour_weights(
    prox_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    mask: torch.Tensor,
    tis_cap: float | None = None,
    mis_low: float | None = None,
    mis_high: float | None = None,
    sequence: bool = False,
    segments: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Correction:
    """Per-token weights and the reduced mask; `sequence`: MIS judges each sequence by the
    product of its tokens' ratios (with a CP `group`, over the whole sequence)."""
    mask = mask.to(prox_logp.dtype)
    response = mask.bool()
    log_ratio = ((prox_logp - behav_logp) * mask).detach()
    # the exponent's range keeps exp finite; the bounds below act far inside it
    ratio = torch.where(response, torch.exp(log_ratio.clamp(-80.0, 80.0)), 0.0)
    if sequence:
        seq = per_sequence(log_ratio, segments, group)
        per_token = seq[:, None].expand_as(log_ratio) if segments is None else seq[segments]
        judged = torch.exp(per_token.clamp(-80.0, 80.0))
    else:
        judged = ratio
    outside = torch.zeros_like(response)
    if mis_low is not None:
        outside |= judged < mis_low
    if mis_high is not None:
        outside |= judged > mis_high
    masked = outside & response
    kept = response & ~masked
    weight = ratio if tis_cap is None else ratio.clamp(max=tis_cap)
    truncated = kept & (ratio > tis_cap) if tis_cap is not None else torch.zeros_like(kept)
    return Correction(
        weight=torch.where(kept, weight, 0.0),
        mask=kept.to(mask.dtype),
        ratio=ratio,
        truncated=truncated,
        masked=masked,
    )
