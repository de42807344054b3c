"""Move a batch from one parallel layout to another with collectives: no central process.

    rollout DP=4 x TP=1  ->  train DP=2 x TP=2

One rank per source replica (its emitter) sends; every rank learns every sample's length
and group (one small all-gather), computes the same balanced assignment, and all fields
of all samples move in ONE `all_to_all_single` of a byte buffer to the first rank of each
destination replica, which broadcasts it within its replica. When both layouts have the
same replicas, samples stay in their replica: nothing moves if every rank that needs the
batch holds it (`Move.NONE`, the batch itself is returned), else each replica's copy
reaches its other ranks. Works on NCCL (CUDA tensors) and gloo (CPU) through the same code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distflow_mc.data.balance import assign
from distflow_mc.data.batch import Batch
from distflow_mc.parallel.layout import Layout, Move, movement

ALIGN = 8  # every field block starts 8-byte aligned so it can be viewed in place


@dataclass(frozen=True)
class Balance:
    """How samples are spread when the layouts differ. Between equal layouts nothing is
    rebalanced: each replica keeps its own samples (the fast path)."""

    keep_groups: bool = True  # GRPO: a group's samples stay on one rank
    equal_counts: bool = False  # every destination replica gets the same number of samples


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


# (kind, name, dtype, trailing shape), kind "t" per-token / "s" per-sample; sorted.
Schema = list[tuple[str, str, str, tuple[int, ...]]]


def _schema(batch: Batch) -> Schema:
    fields = [("t", k, v) for k, v in batch.tokens.items()]
    fields += [("s", k, v) for k, v in batch.samples.items()]
    return sorted(
        (kind, k, str(v.dtype).removeprefix("torch."), tuple(v.shape[1:])) for kind, k, v in fields
    )


def _row_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return getattr(torch, dtype).itemsize * math.prod(shape)


def _object_bytes(batch: Batch) -> list[bytes]:
    names = sorted(batch.objects)
    return [json.dumps([batch.objects[k][i] for k in names]).encode() for i in range(len(batch))]


def _segment_size(schema: Schema, tokens: int, samples: int, obj_bytes: int) -> int:
    size = sum(
        _aligned(_row_bytes(d, s) * (tokens if kind == "t" else samples))
        for kind, _, d, s in schema
    )
    return size + _aligned(obj_bytes)


def _serialize_into(
    buf: torch.Tensor, batch: Batch, idx: list[int], objs: list[bytes], schema: Schema
) -> None:
    """Write samples `idx` field by field into `buf` (uint8, exactly the segment's size):
    one gather per field straight into place, no intermediate batch."""
    index = torch.tensor(idx, dtype=torch.int64, device=batch.offsets.device)
    _, token_rows = batch.token_index(index)
    pos = 0
    for kind, name, _, shape in schema:
        field, rows = (
            (batch.tokens[name], token_rows) if kind == "t" else (batch.samples[name], index)
        )
        nbytes = field.dtype.itemsize * math.prod(shape) * len(rows)
        out = buf[pos : pos + nbytes].view(field.dtype).view(len(rows), *shape)
        torch.index_select(field, 0, rows.to(field.device), out=out)
        pos += _aligned(nbytes)
    raw = b"".join(objs)
    if raw:
        buf[pos : pos + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _deserialize(
    buf: torch.Tensor,
    schema: Schema,
    lengths: list[int],
    obj_sizes: list[int],
    object_names: list[str],
    device: torch.device,
) -> Batch:
    """Views into `buf` (no copy) for the tensor fields; objects parsed in one go."""
    n, total = len(lengths), sum(lengths)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64, device=device).cumsum(0)
    fields: dict[str, dict[str, torch.Tensor]] = {"t": {}, "s": {}}
    pos = 0
    for kind, name, dtype, shape in schema:
        rows = total if kind == "t" else n
        nbytes = _row_bytes(dtype, shape) * rows
        fields[kind][name] = (
            buf[pos : pos + nbytes].view(getattr(torch, dtype)).reshape(rows, *shape)
        )
        pos += _aligned(nbytes)
    # each sample's objects are a JSON array; joined with commas they parse as one list
    raw = bytes(buf[pos : pos + sum(obj_sizes)].cpu().numpy())
    per_sample, start = [], 0
    for size in obj_sizes:
        per_sample.append(raw[start : start + size])
        start += size
    values = json.loads(b"[" + b",".join(per_sample) + b"]") if n else []
    objects = {k: [v[j] for v in values] for j, k in enumerate(object_names)}
    return Batch(offsets, fields["t"], fields["s"], objects)


_groups: dict[tuple[Layout, timedelta], list[dist.ProcessGroup | None]] = {}


def _replica_group(layout: Layout, rank: int, timeout: timedelta) -> dist.ProcessGroup | None:
    """Process group of `rank`'s replica (None for single-rank replicas). Created once per
    layout, by every rank in the same order, with the run's collective timeout."""
    key = (layout, timeout)
    if key not in _groups:
        made = []
        for ranks in layout.replicas():
            made.append(dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None)
        _groups[key] = made
    return _groups[key][layout.coords(rank)["dp"]]


def _exchange_meta(batch: Batch | None, sending: bool, device: torch.device) -> list[dict]:
    """Every rank's (count, schema, object names) and per-sample (length, group, object
    bytes): one all_gather_object and one all_gather of int64s."""
    mine = batch if sending else None
    objs = _object_bytes(mine) if mine is not None else []
    head = [len(mine), _schema(mine), sorted(mine.objects)] if mine is not None else [0, None, None]
    heads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(heads, head)
    width = max(h[0] for h in heads)
    local = torch.zeros(3, width, dtype=torch.int64, device="cpu")
    if mine is not None:
        local[0, : len(mine)] = mine.lengths.cpu()
        local[1, : len(mine)] = mine.samples["group"].cpu().to(torch.int64)
        local[2, : len(mine)] = torch.tensor([len(o) for o in objs], dtype=torch.int64, device="cpu")
    gathered = torch.empty(dist.get_world_size() * 3 * width, dtype=torch.int64, device=device)
    dist.all_gather_single(gathered, local.reshape(-1).to(device))
    per_rank = gathered.view(-1, 3, width).cpu()
    return [
        {
            "count": h[0],
            "schema": h[1],
            "objects": h[2],
            "lengths": per_rank[r, 0, : h[0]].numpy(),
            "groups": per_rank[r, 1, : h[0]].numpy(),
            "obj_sizes": per_rank[r, 2, : h[0]].numpy(),
            "obj_bytes": objs if r == dist.get_rank() else None,
        }
        for r, h in enumerate(heads)
    ]


def _plan(
    meta: list[dict], senders: list[int], src: Layout, dst: Layout, balance: Balance
) -> list[list[tuple[int, list[int]]]]:
    """For each destination replica: (source rank, local sample indices), source order."""
    items = [(s, i) for s in senders for i in range(meta[s]["count"])]
    if movement(src, dst) is not Move.EXCHANGE:  # same replicas: each keeps its samples
        sender_of = [next(r for r in ranks if r in senders) for ranks in src.replicas()]
        parts = [[j for j, (s, _) in enumerate(items) if s == sender_of[d]] for d in range(dst.dp)]
    else:
        lengths = np.concatenate([meta[s]["lengths"] for s in senders]).tolist()
        groups = np.concatenate([meta[s]["groups"] for s in senders]).tolist()
        groups = groups if balance.keep_groups else None
        parts = assign(lengths, dst.dp, groups, balance.equal_counts)
    plan = []
    for part in parts:
        by_source: dict[int, list[int]] = {s: [] for s in senders}
        for j in part:
            s, i = items[j]
            by_source[s].append(i)
        plan.append(list(by_source.items()))
    return plan


def redistribute(
    batch: Batch | None,
    src: Layout,
    dst: Layout,
    balance: Balance,
    device: torch.device,
    timeout: timedelta,
) -> Batch | None:
    """Called on every rank. `batch` is this rank's source-replica batch (only the
    replica's emitter's copy is read; other ranks may pass None). Returns this rank's
    destination-replica batch on `device`, the same on every rank of the replica (None on
    a rank that needs none when nothing had to move). New process groups get `timeout`."""
    assert src.world_size == dst.world_size == dist.get_world_size(), (src, dst)
    rank = dist.get_rank()
    if movement(src, dst) is Move.NONE:
        assert batch is not None or rank not in dst.holders(), "holders hold their batch"
        return batch if rank in dst.holders() else None
    senders = src.emitters()
    meta = _exchange_meta(batch, rank in senders, device)
    schemas = {json.dumps(m["schema"]) for m in meta if m["schema"] is not None}
    if len(schemas) > 1:
        raise ValueError(f"source replicas disagree on the batch fields: {sorted(schemas)}")
    if not schemas:
        raise ValueError("redistribute: no source replica holds a batch")
    schema = next(m["schema"] for m in meta if m["schema"] is not None)
    object_names = next(m["objects"] for m in meta if m["objects"] is not None)
    plan = _plan(meta, senders, src, dst, balance)
    leaders = [ranks[0] for ranks in dst.replicas()]
    mine = plan[dst.coords(rank)["dp"]]
    leader = leaders[dst.coords(rank)["dp"]]

    def size(s: int, idx: list[int]) -> int:
        m = meta[s]
        tokens = int(m["lengths"][idx].sum())
        return _segment_size(schema, tokens, len(idx), int(m["obj_sizes"][idx].sum()))

    send_sizes, recv_sizes = [0] * dst.world_size, [0] * dst.world_size
    outgoing = (
        [(to, dict(plan[d])[rank]) for d, to in enumerate(leaders)] if rank in senders else []
    )
    for to, idx in outgoing:
        send_sizes[to] = size(rank, idx)
    inp = torch.empty(
        sum(send_sizes), dtype=torch.uint8, device=batch.offsets.device if outgoing else device
    )
    pos = 0
    for to, idx in outgoing:
        objs = [meta[rank]["obj_bytes"][i] for i in idx]
        _serialize_into(inp[pos : pos + send_sizes[to]], batch, idx, objs, schema)
        pos += send_sizes[to]
    if rank == leader:
        for s, idx in mine:
            recv_sizes[s] = size(s, idx)
    out = torch.empty(sum(size(s, idx) for s, idx in mine), dtype=torch.uint8, device=device)
    dist.all_to_all_single(
        out if rank == leader else out[:0], inp.to(device), recv_sizes, send_sizes
    )
    group = _replica_group(dst, rank, timeout)
    if group is not None:
        dist.broadcast(out, src=leader, group=group)
    pieces, pos = [], 0
    for s, idx in mine:
        nbytes, m = size(s, idx), meta[s]
        lengths = m["lengths"][idx].tolist()
        obj_sizes = m["obj_sizes"][idx].tolist()
        pieces.append(
            _deserialize(out[pos : pos + nbytes], schema, lengths, obj_sizes, object_names, device)
        )
        pos += nbytes
    return Batch.concat(pieces)
