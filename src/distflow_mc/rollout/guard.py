"""Mismatch guard: the engine's log-probs against the actor's recomputed ones for the same
tokens. A gap that grows points at a broken weight sync or a numerics mismatch."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def logprob_gap(
    engine: torch.Tensor, actor: torch.Tensor, mask: torch.Tensor, warn_above: float | None = None
) -> dict[str, float]:
    """Mean and max |engine - actor| over masked tokens (any equal shapes), and the token
    count (to combine means across ranks)."""
    diff = (engine.float() - actor.float()).abs()[mask.bool()]
    gap = {
        "rollout/logprob_gap_mean": float(diff.mean()) if diff.numel() else 0.0,
        "rollout/logprob_gap_max": float(diff.max()) if diff.numel() else 0.0,
        "tokens": float(diff.numel()),
    }
    if warn_above is not None and gap["rollout/logprob_gap_mean"] > warn_above:
        log.warning(
            "rollout and actor log-probs differ by %.4f on average (max %.4f): check weight"
            " sync and the engine's numerics (rollout.logprob_gap_warn=%s)",
            gap["rollout/logprob_gap_mean"],
            gap["rollout/logprob_gap_max"],
            warn_above,
        )
    return gap
