"""DAPO's data-side pieces (Yu et al. 2025, arXiv 2503.14476)."""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling: True for samples whose group's rewards are not all equal (a group
    of equal rewards has zero advantage everywhere and teaches nothing)."""
    _, index = torch.unique(groups, return_inverse=True)
    k = int(index.max()) + 1 if len(index) else 0
    high = rewards.new_full((k,), -torch.inf).scatter_reduce(0, index, rewards, "amax")
    low = rewards.new_full((k,), torch.inf).scatter_reduce(0, index, rewards, "amin")
    return (high > low)[index]


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """Soft overlong punishment (DAPO eq. 13): 0 up to max_len - buffer, then falling
    linearly to -factor at max_len."""
    start = max_len - buffer
    return -factor * ((lengths.float() - start) / buffer).clamp(0.0, 1.0)
