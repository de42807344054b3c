"""Micro-batches for the trainer: split a rank's samples by a token budget (dynamic batch
size) and pad each micro-batch to a right-padded [b, s] layout for megatron; with
sequence packing, several samples share a row (each with its own positions, attending
only to itself)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from distflow_mc.data.batch import Batch


def split_by_token_budget(
    lengths: Sequence[int], max_tokens: int, multiple_of: int = 1
) -> list[list[int]]:
    """Sample indices per micro-batch. A micro-batch is padded to its longest sample, so its
    padded size (rows x longest) is what costs memory and time: it stays within
    `max_tokens` (a sample longer than the budget gets a micro-batch of its own). Samples
    are taken longest first and each micro-batch is filled while it fits, so samples of
    similar length share one and little is padding. The count is a multiple of
    `multiple_of` when there are enough samples (interleaved pipelines need it; the
    schedule pads the rest): the micro-batch with most rows is halved until it is. The
    heaviest micro-batches come first, so the pipeline's tail runs the light ones."""
    parts: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        part = parts[-1] if parts else None
        if part is None or (len(part) + 1) * lengths[part[0]] > max_tokens:
            parts.append([i])
        else:
            part.append(i)
    while len(parts) % multiple_of and len(parts) < len(lengths):
        widest = max(range(len(parts)), key=lambda p: (len(parts[p]), -p))
        part = parts.pop(widest)
        parts += [part[: len(part) // 2], part[len(part) // 2 :]]
    return sorted(parts, key=lambda p: (-padded_size(p, lengths), p))


def padded_size(part: Sequence[int], lengths: Sequence[int]) -> int:
    """Token slots of a right-padded micro-batch: rows x its longest sample."""
    return len(part) * max((lengths[i] for i in part), default=0)


def pack_rows(lengths: Sequence[int]) -> list[list[int]]:
    """Samples into rows as long as the longest one, best fit, longest first: the rows a
    packed micro-batch is made of (sample indices per row, longest row first)."""
    capacity = max(lengths, default=0)
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, row))
    used = [sum(lengths[i] for i in row) for row in rows]
    return [rows[r] for r in sorted(range(len(rows)), key=lambda r: (-used[r], r))]


def pad_microbatch(batch: Batch, indices: Sequence[int], pad_value: int = 0) -> dict:
    """Right-padded [b, s] tensors of the per-token fields of `indices` (s = the longest),
    plus `attention_mask` (1 on real tokens) and the per-sample fields."""
    return packed_microbatch(batch, [[i] for i in indices], pad_value)


def packed_microbatch(batch: Batch, rows: Sequence[Sequence[int]], pad_value: int = 0) -> dict:
    """[b, s] tensors of the per-token fields, row r holding the samples `rows[r]` end to
    end and then padding (s = the longest row), `attention_mask` (1 on real tokens) and
    the per-sample fields, in the order the rows list the samples. When a row holds
    several samples, also `positions` (each token's position in its sample) and
    `segments` (each token's sample, counted over the micro-batch; 0 on padding)."""
    sub = batch.select([i for row in rows for i in row])
    device = sub.offsets.device
    b = len(rows)
    sizes = torch.tensor([len(row) for row in rows], dtype=torch.int64, device=device)
    row_of = torch.repeat_interleave(torch.arange(b, device=device), sizes)
    used = torch.zeros(b, dtype=torch.int64, device=device).index_add_(0, row_of, sub.lengths)
    s = int(used.max()) if rows else 0
    real = torch.arange(s, device=device)[None, :] < used[:, None]
    out: dict[str, torch.Tensor] = {"attention_mask": real}
    for name, packed in sub.tokens.items():
        fill = pad_value if name == "input_ids" else 0
        dense = torch.full(
            (b, s, *packed.shape[1:]), fill, dtype=packed.dtype, device=packed.device
        )
        dense[real.to(packed.device)] = packed
        out[name] = dense
    if any(len(row) > 1 for row in rows):
        owner = sub.token_owner()
        out["segments"] = torch.zeros(b, s, dtype=torch.int64, device=device)
        out["segments"][real] = owner
        out["positions"] = torch.zeros(b, s, dtype=torch.int64, device=device)
        out["positions"][real] = torch.arange(sub.num_tokens, device=device) - sub.offsets[owner]
    out.update(sub.samples)
    return out
