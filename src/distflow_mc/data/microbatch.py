"""Micro-batches for the trainer: split a rank's samples by a token budget (dynamic batch
size) and pad each micro-batch to a right-padded [b, s] layout for megatron."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from distflow_mc.data.balance import karmarkar_karp
from distflow_mc.data.batch import Batch


def split_by_token_budget(
    lengths: Sequence[int], max_tokens: int, multiple_of: int = 1
) -> list[list[int]]:
    """Sample indices per micro-batch: every micro-batch holds at most `max_tokens` tokens
    (a sample longer than the budget gets a micro-batch of its own), token counts are
    balanced, the count is a multiple of `multiple_of` when there are enough samples
    (interleaved pipelines need it; the schedule pads the rest), and heavier micro-batches
    come first so the pipeline's tail runs the light ones."""
    n = len(lengths)
    long_ones = [[i] for i in range(n) if lengths[i] > max_tokens]
    rest = [i for i in range(n) if lengths[i] <= max_tokens]
    weights = [lengths[i] for i in rest]
    count = max(1, math.ceil(sum(weights) / max_tokens)) if rest else 0
    while rest:
        total = len(long_ones) + count
        if count < len(rest) and total % multiple_of:
            count = min(len(rest), count + multiple_of - total % multiple_of)
        parts = [p for p in karmarkar_karp(weights, count) if p]
        if count >= len(rest) or all(sum(weights[j] for j in p) <= max_tokens for p in parts):
            break
        count += 1
    inner = [[rest[j] for j in p] for p in parts] if rest else []
    return _heavy_first(long_ones + inner, lengths)


def _heavy_first(parts: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    return sorted(parts, key=lambda p: (-sum(lengths[i] for i in p), p))


def pad_microbatch(batch: Batch, indices: Sequence[int], pad_value: int = 0) -> dict:
    """Right-padded [b, s] tensors of the per-token fields of `indices` (s = the longest),
    plus `attention_mask` (1 on real tokens) and the per-sample fields."""
    sub = batch.select(indices)
    lengths = sub.lengths
    b, s = len(sub), int(lengths.max()) if len(sub) else 0
    real = torch.arange(s, device=lengths.device)[None, :] < lengths[:, None]
    out: dict[str, torch.Tensor] = {"attention_mask": real}
    for name, packed in sub.tokens.items():
        fill = pad_value if name == "input_ids" else 0
        dense = torch.full(
            (b, s, *packed.shape[1:]), fill, dtype=packed.dtype, device=packed.device
        )
        dense[real.to(packed.device)] = packed
        out[name] = dense
    out.update(sub.samples)
    return out
