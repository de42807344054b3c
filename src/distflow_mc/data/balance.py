"""Which destination rank gets which samples: balanced token counts, a pure function that
every rank computes identically from the same lengths.

Karmarkar-Karp's largest differencing method, k-way (Karmarkar & Karp 1982; the k-way
form as in Michiels et al. 2007): start with one partial partition per item (or per k
items when every part must get the same count), repeatedly merge the two partitions with
the largest spread by pairing the heaviest part of one with the lightest of the other.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


def _merge(a: list[tuple[int, list[int]]], b: list[tuple[int, list[int]]]) -> list:
    a = sorted(a, key=lambda part: (part[0], part[1]))
    b = sorted(b, key=lambda part: (-part[0], part[1]))
    merged = [(wa + wb, ia + ib) for (wa, ia), (wb, ib) in zip(a, b, strict=True)]
    return sorted(merged, key=lambda part: (part[0], part[1]))


def karmarkar_karp(weights: Sequence[int], k: int, equal_counts: bool = False) -> list[list[int]]:
    """Partition item indices into k parts with nearly equal weight sums. With
    `equal_counts`, every part gets len(weights) / k items (must divide)."""
    n = len(weights)
    if equal_counts and n % k:
        raise ValueError(f"{n} items cannot split into {k} parts of equal count")
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    seeds = [order[i : i + k] for i in range(0, n, k)] if equal_counts else [[i] for i in order]
    heap = []
    for tie, items in enumerate(seeds):
        parts = [(weights[i], [i]) for i in items] + [(0, [])] * (k - len(items))
        parts.sort(key=lambda part: (part[0], part[1]))
        heapq.heappush(heap, (-(parts[-1][0] - parts[0][0]), tie, parts))
    tie = len(seeds)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = _merge(a, b)
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), tie, merged))
        tie += 1
    parts = heap[0][2] if heap else [(0, [])] * k
    return sorted((sorted(items) for _, items in parts), key=lambda items: items[:1] or [n])


def destinations(
    lengths: Sequence[int] | np.ndarray,
    k: int,
    groups: Sequence[int] | np.ndarray | None = None,
    equal_counts: bool = False,
) -> np.ndarray:
    """Destination (0..k-1) of every sample, token counts balanced. With `groups`, samples
    of one group always land together (GRPO normalises within a group); with
    `equal_counts`, every destination gets the same number of samples (or groups).
    Vectorised over samples: only the groups (or samples) go through the partitioner."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if k == 1:
        return np.zeros(len(lengths), dtype=np.int64)
    if groups is None:
        inverse, weights = np.arange(len(lengths)), lengths
    else:
        _, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
        if equal_counts and len(set(sizes.tolist())) > 1:
            raise ValueError(
                f"equal counts with whole groups needs equal group sizes, got {set(sizes.tolist())}"
            )
        weights = np.zeros(len(sizes), dtype=np.int64)
        np.add.at(weights, inverse, lengths)
    part_of = np.empty(len(weights), dtype=np.int64)
    for d, part in enumerate(karmarkar_karp(weights.tolist(), k, equal_counts)):
        part_of[part] = d
    return part_of[inverse]


def assign(
    lengths: Sequence[int],
    k: int,
    groups: Sequence[int] | None = None,
    equal_counts: bool = False,
) -> list[list[int]]:
    """Sample indices for each of k destinations (see `destinations`), ascending."""
    if not len(lengths):
        return [[] for _ in range(k)]
    dest = destinations(lengths, k, groups, equal_counts)
    return [np.flatnonzero(dest == d).tolist() for d in range(k)]
