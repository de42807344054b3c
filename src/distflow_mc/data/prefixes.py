"""A group's common prefix sent once: what a redistribution moves for GRPO-style groups.

A group's n samples begin with the same prompt (and a multi-turn group with whatever its
samples have in common). `share` keeps, of every sample after its group's first (the
group's head, in batch order), only the tokens past the longest prefix it has in common
with the head in every per-token field; `restore` puts them back from the head. Exact: a
prefix is shared only where every field is bitwise equal (a NaN is never equal, so it
travels). The per-sample field `PREFIX` says what was done: -1 on a head, else the number
of leading tokens taken from the head (0: none). `restore` finds each sample's head as the
nearest head of its group before it, so the two need only keep each sender's samples in
order and a group's samples together (a redistribution keeping groups does both).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distflow_mc.data.batch import Batch

PREFIX = "prefix_shared"
HEAD = -1


def _spans(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of samples laid end to end with these lengths: its sample, and its
    position within that sample."""
    n = len(lengths)
    owner = torch.repeat_interleave(torch.arange(n, device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return owner, torch.arange(len(owner), device=lengths.device) - starts[owner]


def _matched(
    batch: Batch, head: torch.Tensor, span: torch.Tensor, fields: Iterable[torch.Tensor]
) -> torch.Tensor:
    """Per sample, how many of its first `span` tokens equal its head's in every field."""
    owner, pos = _spans(span)
    offsets = batch.offsets
    mine, theirs = offsets[owner] + pos, offsets[head[owner]] + pos
    differs = torch.zeros(len(owner), dtype=torch.bool, device=span.device)
    for t in fields:
        ne = t[mine.to(t.device)] != t[theirs.to(t.device)]
        differs |= (ne.flatten(1).any(1) if ne.dim() > 1 else ne).to(span.device)
    return span.scatter_reduce(0, owner[differs], pos[differs], "amin")


def share(batch: Batch) -> Batch:
    """`batch` with each sample's prefix in common with its group's head left out of its
    per-token fields, and `PREFIX` added (int32). Offsets become the tokens kept."""
    n, dev = len(batch), batch.offsets.device
    prefix = torch.zeros(n, dtype=torch.int32, device=dev)
    if not n or not batch.tokens:
        return Batch(batch.offsets, batch.tokens, {**batch.samples, PREFIX: prefix}, batch.objects)
    index = torch.arange(n, device=dev)
    _, group = torch.unique(batch.samples["group"].to(dev), return_inverse=True)
    first = torch.full((int(group.max()) + 1,), n, device=dev)
    head = first.scatter_reduce(0, group, index, "amin")[group]
    lengths, offsets = batch.lengths, batch.offsets
    common = torch.where(head == index, 0, torch.minimum(lengths, lengths[head]))
    # the first token in every field, then field by field (the token ids first) within what
    # matched so far: a batch without common prefixes costs one comparison per sample
    shared = _matched(batch, head, common.clamp(max=1), batch.tokens.values())
    shared = torch.where(shared > 0, common, 0)
    ids = ["input_ids"] if "input_ids" in batch.tokens else []
    for name in [*ids, *(k for k in batch.tokens if k not in ids)]:
        shared = _matched(batch, head, shared, [batch.tokens[name]])
    prefix = torch.where(head == index, HEAD, shared).to(torch.int32)
    if not shared.any():  # nothing in common: nothing to leave out
        return Batch(offsets, batch.tokens, {**batch.samples, PREFIX: prefix}, batch.objects)
    owner, pos = _spans(lengths)
    kept = pos >= shared[owner]
    new = torch.zeros_like(offsets)
    new[1:] = torch.cumsum(lengths - shared, 0)
    return Batch(
        new,
        {k: v[kept.to(v.device)] for k, v in batch.tokens.items()},
        {**batch.samples, PREFIX: prefix},
        batch.objects,
    )


def restore(batch: Batch) -> Batch:
    """The inverse of `share` (after any move that keeps a sender's samples in order and
    groups together): every sample whole again, `PREFIX` gone."""
    samples = dict(batch.samples)
    prefix = samples.pop(PREFIX).to(batch.offsets.device)
    shared = prefix.clamp(min=0).long()
    offsets = batch.offsets
    full = batch.lengths + shared
    new = torch.zeros_like(offsets)
    new[1:] = torch.cumsum(full, 0)
    if not shared.any() or not batch.tokens:  # no tokens to put back: only the offsets
        return Batch(new, batch.tokens, samples, batch.objects)
    heads, last = list(range(len(batch))), {}
    for i, (g, p) in enumerate(zip(samples["group"].tolist(), prefix.tolist(), strict=True)):
        if p == HEAD:
            last[g] = i
        elif p > 0:
            if g not in last:
                raise ValueError(f"sample {i} (group {g}) shares a prefix with no head before it")
            heads[i] = last[g]
    head = torch.tensor(heads, device=shared.device)
    owner, pos = _spans(full)
    s = shared[owner]
    rows = torch.where(pos < s, offsets[head[owner]] + pos, offsets[owner] + pos - s)
    tokens = {k: v[rows.to(v.device)] for k, v in batch.tokens.items()}
    return Batch(new, tokens, samples, batch.objects)
