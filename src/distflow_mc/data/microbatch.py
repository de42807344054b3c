"""Micro-batches for the trainer: split a rank's samples by a token budget (dynamic batch
size) and pad each micro-batch to a right-padded [b, s] layout for megatron; with
sequence packing, several samples share a row (each with its own positions, attending
only to itself)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Item:
    """Samples of one group laid out in a row: the first `shared` tokens once (the prefix
    they have in common), then each sample's tokens after them. shared=0: each sample
    whole, one after the other."""

    samples: tuple[int, ...]
    shared: int = 0


def shared_items(
    lengths: Sequence[int],
    groups: Sequence[int],
    prompts: Sequence[int],
    max_tokens: int,
    min_share: float = 0.0,
) -> list[Item]:
    """Each group's samples as items sharing their prompt but its last token (which stays
    with each sample: its output predicts the sample's first token), split where an item
    would pass `max_tokens`; single samples where nothing is shared. When the tokens saved
    are below `min_share` of all tokens, every sample on its own."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    items: list[Item] = []
    for samples in members.values():
        shared = min(min(prompts[i] for i in samples), min(lengths[i] for i in samples)) - 1
        if len(samples) < 2 or shared < 1:
            items += [Item((i,)) for i in samples]
            continue
        chunk: list[int] = []
        for i in samples:
            size = shared + sum(lengths[j] - shared for j in (*chunk, i))
            if chunk and size > max_tokens:
                items.append(_item(chunk, shared))
                chunk = []
            chunk.append(i)
        items.append(_item(chunk, shared))
    saved = sum((len(item.samples) - 1) * item.shared for item in items)
    if saved < min_share * sum(lengths):
        return [Item((i,)) for i in range(len(lengths))]
    return items


def _item(samples: list[int], shared: int) -> Item:
    """Samples sharing `shared` tokens; a chunk of one shares nothing."""
    return Item(tuple(samples), shared if len(samples) > 1 else 0)


def item_size(item: Item, lengths: Sequence[int]) -> int:
    return item.shared + sum(lengths[i] - item.shared for i in item.samples)


def pad_microbatch(batch: Batch, indices: Sequence[int], pad_value: int = 0) -> dict:
    """Right-padded [b, s] tensors of the per-token fields of `indices` (s = the longest),
    plus `attention_mask` (1 on real tokens) and the per-sample fields."""
    return packed_microbatch(batch, [[Item((i,))] for i in indices], pad_value)[0]


def packed_microbatch(
    batch: Batch, rows: Sequence[Sequence[Item]], pad_value: int = 0, spans: bool = False
) -> tuple[dict, torch.Tensor]:
    """[b, s] tensors of the per-token fields, row r holding the items `rows[r]` end to end
    and then padding (s = the longest row), `attention_mask` (1 on real tokens) and the
    per-sample fields, in the order the rows list the samples. When a row holds several
    samples, also `positions` (each token's position in its sample), `spans` and
    `prefixes` (which tokens attend to which: models/spans.py; a shared prefix is a span
    that each sample's own span continues) and `segments` (each token's sample, counted
    over the micro-batch, for per-sequence sums; a shared prefix counts as its item's first
    sample's, 0 on padding); with `spans`, always (context parallelism: a cut batch, its
    own `positions`, data/chunks.py). Also returns where each token of those samples, in order,
    sits in the flattened [b, s] (a shared prefix's tokens: where its one copy sits)."""
    device = batch.offsets.device
    lengths = batch.lengths.tolist()
    order = [i for row in rows for item in row for i in item.samples]
    rank = {i: k for k, i in enumerate(order)}
    # per piece: row, sample, first token, tokens, span it continues (0: none), segment;
    # per sample: its shared prefix's column (or -1) and its own piece's, within its row
    pieces, cols, used = [], {}, []
    for r, row in enumerate(rows):
        col = 0
        for item in row:
            prefix, at = 0, -1
            if item.shared:
                pieces.append((r, item.samples[0], 0, item.shared, 0, rank[item.samples[0]]))
                prefix, at, col = len(pieces), col, col + item.shared
            for i in item.samples:
                n = lengths[i] - item.shared
                pieces.append((r, i, item.shared, n, prefix, rank[i]))
                cols[i] = (r, at, col, item.shared)
                col += n
        used.append(col)
    b, s = len(rows), max(used, default=0)
    real = torch.arange(s, device=device)[None, :] < torch.tensor(used, device=device)[:, None]
    out: dict[str, torch.Tensor] = {"attention_mask": real}
    p = torch.tensor(pieces, dtype=torch.int64, device=device).reshape(-1, 6)
    count = p[:, 3]
    piece = torch.repeat_interleave(torch.arange(len(p), device=device), count)
    within = torch.arange(len(piece), device=device) - (count.cumsum(0) - count)[piece]
    position = p[piece, 2] + within  # in its sample
    src = batch.offsets[p[piece, 1]] + position  # in the batch's tokens
    for name, packed in batch.tokens.items():
        fill = pad_value if name == "input_ids" else 0
        dense = torch.full(
            (b, s, *packed.shape[1:]), fill, dtype=packed.dtype, device=packed.device
        )
        dense[real.to(packed.device)] = packed[src.to(packed.device)]
        out[name] = dense
    if len(p) > b or spans:  # some row holds several samples (or pieces of a cut one)
        ids = (("spans", piece + 1), ("prefixes", p[piece, 4]), ("segments", p[piece, 5]))
        own = () if "positions" in batch.tokens else (("positions", position),)
        for name, value in (*own, *ids):
            out[name] = torch.zeros(b, s, dtype=torch.int64, device=device)
            out[name][real] = value
    # token t of sample i: its prefix's copy while t < shared, else its own piece's
    at = torch.tensor([cols[i] for i in order], dtype=torch.int64, device=device).reshape(-1, 4)
    row, first, col, shared = at.T
    n = torch.tensor([lengths[i] for i in order], dtype=torch.int64, device=device)
    t = torch.arange(int(n.sum()), device=device) - torch.repeat_interleave(n.cumsum(0) - n, n)
    inside = torch.repeat_interleave(row * s + first, n) + t
    after = torch.repeat_interleave(row * s + col - shared, n) + t
    places = torch.where(t < torch.repeat_interleave(shared, n), inside, after)
    idx = torch.tensor(order, dtype=torch.int64, device=device)
    out.update({k: v[idx] for k, v in batch.samples.items()})
    return out, places
