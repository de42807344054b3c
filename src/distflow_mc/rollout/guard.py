"""Mismatch guard: the engine's log-probs against the actor's recomputed ones for the same
tokens. A gap that grows points at a broken weight sync or a numerics mismatch."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def logprob_gap(
    engine: torch.Tensor, actor: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sum and max of |engine - actor| over masked tokens (any equal shapes), and the token
    count (to combine means across ranks), as tensors on the inputs' device."""
    diff = (engine.float() - actor.float()).abs() * mask
    return {
        "sum": diff.sum(),
        "max": diff.max() if diff.numel() else diff.new_zeros(()),
        "tokens": mask.float().sum(),
    }


def warn_on_gap(record: dict[str, float], warn_above: float) -> None:
    """One warning per step (rank 0, reduced over all ranks) when the mean gap is large."""
    mean = record.get("rollout/logprob_gap_mean", 0.0)
    if mean > warn_above:
        log.warning(
            "rollout and actor log-probs differ by %.4f on average (max %.4f): check weight"
            " sync and the engine's numerics (rollout.logprob_gap_warn=%s)",
            mean,
            record.get("rollout/logprob_gap_max", float("nan")),
            warn_above,
        )
