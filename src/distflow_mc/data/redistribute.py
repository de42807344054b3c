"""Move a batch from one parallel layout to another with collectives: no central process.

    rollout DP=4 x TP=1  ->  train DP=2 x TP=2

One rank per source replica (its emitter) sends. Every rank learns every sample's length
and group from one fixed-layout integer all-gather, computes the same balanced assignment,
and each field moves in one `all_to_all_single`: the sender orders its samples by
destination and gathers each field into its send buffer with one `index_select`; the
receiver gets each field contiguous, in source order, and keeps it as a view (no unpacking
copy). Objects (strings, dicts), when they travel, are serialised once per destination.

Two ways to reach the ranks of a destination replica, chosen by measured cost (the same
choice on every rank): DIRECT sends every rank of the replica its copy; LEADERS sends
the replica's first rank and broadcasts inside the replica. When both layouts have the
same replicas, samples stay in their replica: nothing moves if every rank that needs the
batch holds it (`Move.NONE`), else each replica's copy reaches its other ranks.
Only the fields named in `keep` travel. Works on NCCL and gloo through the same code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import numpy as np
import torch
import torch.distributed as dist

from distflow_mc.data.balance import destinations
from distflow_mc.data.batch import Batch
from distflow_mc.parallel.layout import Layout, Move, movement

ALIGN = 8  # every field starts 8-byte aligned in the buffers so it can be viewed in place


@dataclass(frozen=True)
class Balance:
    """How samples are spread when the layouts differ. Between equal layouts nothing is
    rebalanced: each replica keeps its own samples (the fast path)."""

    keep_groups: bool = True  # GRPO: a group's samples stay on one rank
    equal_counts: bool = False  # every destination replica gets the same number of samples


class Pattern(Enum):
    AUTO = "auto"  # the faster of the two below, as measured (`_Measured`)
    DIRECT = "direct"  # one all-to-all to every rank of each destination replica
    LEADERS = "leaders"  # all-to-all to each replica's first rank, then a broadcast


# (kind, name, dtype, trailing shape); kind "t" per token, "s" per sample; sorted by kind+name
Field = tuple[str, str, str, tuple[int, ...]]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _fields(batch: Batch) -> list[Field]:
    fields = [("t", k, v) for k, v in batch.tokens.items()]
    fields += [("s", k, v) for k, v in batch.samples.items()]
    return sorted(
        (kind, k, str(v.dtype).removeprefix("torch."), tuple(v.shape[1:])) for kind, k, v in fields
    )


def _row_bytes(field: Field) -> int:
    return getattr(torch, field[2]).itemsize * math.prod(field[3])


class _Clock:
    """Phase timings (synchronising the device first, so GPU work lands in its phase)."""

    def __init__(self, phases: dict[str, float] | None, device: torch.device) -> None:
        self.phases, self.device, self.last = phases, device, time.perf_counter()

    def restart(self) -> None:
        """Time spent outside the transfer's calls (a stage running) counts to no phase."""
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.phases is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


@dataclass
class _Meta:
    """What every rank knows about every sender after the metadata all-gather."""

    fields: list[Field]
    objects: list[str]
    lengths: dict[int, np.ndarray]  # sender -> per-sample token counts
    groups: dict[int, np.ndarray]  # sender -> per-sample group ids

    def nbytes(self) -> int:
        """Bytes of the tensor fields of all senders' batches."""
        tokens = sum(int(v.sum()) for v in self.lengths.values())
        samples = sum(len(v) for v in self.lengths.values())
        return sum(_row_bytes(f) * (tokens if f[0] == "t" else samples) for f in self.fields)


HEAD = 3  # count, schema bytes, this rank's time of the last AUTO call
_widths: dict[bool, int] = {}  # payload width of the last first / later round (the same everywhere)


def _exchange_meta(
    batch: Batch | None, senders: list[int], device: torch.device, sent: set[str]
) -> _Meta:
    """One int64 all-gather of a fixed-layout row per rank: [count, schema bytes, time of
    the last AUTO call], then (in the first round) its lengths and groups, and its schema
    (the fields and object names not `sent` yet, as JSON bytes). The payload width is the
    last call's; when a rank's payload does not fit, every rank sees it in the heads and a
    second all-gather at the needed width follows."""
    first = not sent
    rank = dist.get_rank()
    mine = batch if rank in senders else None
    payload = np.zeros(0, dtype=np.int64)
    n, schema = 0, b""
    if mine is not None:
        n = len(mine)
        fields = [f for f in _fields(mine) if f[1] not in sent]
        schema = json.dumps([fields, sorted(set(mine.objects) - sent)]).encode()
        packed = np.frombuffer(schema + bytes(-len(schema) % 8), dtype=np.int64)
        per_sample = [mine.lengths.cpu().numpy(), mine.samples["group"].cpu().numpy()]
        payload = np.concatenate([*(per_sample if first else []), packed])
    head = [n, len(schema), _measured.elapsed_ns]
    width = _widths.get(first, 0)
    table = _all_gather_rows(np.array(head, dtype=np.int64), payload, width, device)
    counts, sizes, elapsed = table[:, :HEAD].T
    needed = int(max((2 * counts if first else 0) + -(-sizes // 8)))
    if needed > width:  # someone's payload did not fit: again, wide enough
        table = _all_gather_rows(np.array(head, dtype=np.int64), payload, needed, device)
    _widths[first] = max(width, needed)
    if first:
        _measured.update(int(elapsed.max()))
    rows = table[:, HEAD:]
    skip = 2 * counts if first else np.zeros_like(counts)
    schemas = {s: rows[s, skip[s] :].tobytes()[: sizes[s]] for s in senders if sizes[s]}
    if not schemas:
        raise ValueError("redistribute: no source replica holds a batch")
    if len(set(schemas.values())) > 1:
        raise ValueError(
            "source replicas disagree on the batch fields: "
            f"{sorted({s.decode() for s in schemas.values()})}"
        )
    fields, objects = json.loads(next(iter(schemas.values())))
    return _Meta(
        [(k, n_, d, tuple(sh)) for k, n_, d, sh in fields],
        objects,
        {s: rows[s, : counts[s]] for s in senders} if first else {},
        {s: rows[s, counts[s] : 2 * counts[s]] for s in senders} if first else {},
    )


def _all_gather_rows(
    head: np.ndarray, payload: np.ndarray, width: int, device: torch.device
) -> np.ndarray:
    """[world, HEAD + width] int64: every rank's head and payload (cut to `width`)."""
    world = dist.get_world_size()
    row = np.zeros(HEAD + width, dtype=np.int64)
    row[:HEAD] = head
    cut = payload[:width]
    row[HEAD : HEAD + len(cut)] = cut
    out = torch.empty(world * len(row), dtype=torch.int64, device=device)
    dist.all_gather_single(out, torch.from_numpy(row).to(device))
    return out.view(world, len(row)).cpu().numpy()


@dataclass
class _Plan:
    dest: dict[int, np.ndarray]  # sender -> destination replica of each of its samples
    recipients: list[list[int]]  # destination replica -> the ranks the all-to-all reaches
    holders: list[list[int]]  # destination replica -> every rank that ends up holding it
    pattern: Pattern


def _plan(
    meta: _Meta,
    senders: list[int],
    src: Layout,
    dst: Layout,
    balance: Balance,
    pattern: Pattern,
) -> _Plan:
    if movement(src, dst) is not Move.EXCHANGE:  # same replicas: each keeps its samples
        dest = {s: np.full(len(meta.lengths[s]), dst.coords(s)["dp"]) for s in senders}
    else:
        lengths = np.concatenate([meta.lengths[s] for s in senders])
        groups = np.concatenate([meta.groups[s] for s in senders]) if balance.keep_groups else None
        flat = destinations(lengths, dst.dp, groups, balance.equal_counts)
        bounds = np.cumsum([0] + [len(meta.lengths[s]) for s in senders])
        dest = {s: flat[bounds[i] : bounds[i + 1]] for i, s in enumerate(senders)}
    holders = [sorted(set(ranks) & dst.holders()) for ranks in dst.replicas()]
    if pattern is Pattern.AUTO:  # the same on one-rank holder sets: nothing to measure
        multi = any(len(h) > 1 for h in holders)
        pattern = _measured.choose((src, dst), meta.nbytes()) if multi else Pattern.DIRECT
    recipients = holders if pattern is Pattern.DIRECT else [h[:1] for h in holders]
    return _Plan(dest, recipients, holders, pattern)


class _Measured:
    """AUTO's choice by measured cost: each pattern is tried once per (source, destination)
    layout pair, then the one with fewer seconds per byte (the slowest rank's, from the
    metadata exchange on) runs, its cost updated by every call. Every rank reports its time
    of the last AUTO call in the next call's metadata header, so all ranks hold the same
    numbers and make the same choice."""

    def __init__(self) -> None:
        self.cost: dict[tuple[Layout, Layout], dict[Pattern, float]] = {}
        self.last: tuple[tuple[Layout, Layout], Pattern, int] | None = None
        self.elapsed_ns = 0  # this rank's, for the last AUTO call

    def update(self, slowest_ns: int) -> None:
        if self.last is not None:
            key, pattern, nbytes = self.last
            costs = self.cost.setdefault(key, {})
            value = slowest_ns / max(nbytes, 1)
            costs[pattern] = value if pattern not in costs else (costs[pattern] + value) / 2
        self.last, self.elapsed_ns = None, 0

    def choose(self, key: tuple[Layout, Layout], nbytes: int) -> Pattern:
        costs = self.cost.get(key, {})
        untried = [p for p in (Pattern.DIRECT, Pattern.LEADERS) if p not in costs]
        pattern = untried[0] if untried else min(costs, key=costs.__getitem__)
        self.last = (key, pattern, nbytes)
        return pattern


_measured = _Measured()


def _send_buffers(
    batch: Batch,
    dest: np.ndarray,
    replica_of_rank: list[int | None],
    replicas: int,
    fields: list[Field],
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Per field: [rows, row bytes] uint8 rows for each rank in rank order (rank r gets the
    samples whose destination is its replica, none when it receives nothing), and the row
    count per rank. The samples are ordered by destination with one index_select per
    field (none when they already are); a replica that several ranks receive directly is
    repeated for each of them."""
    perm = np.argsort(dest, kind="stable")
    lengths = batch.lengths.cpu().numpy()
    n_of = np.bincount(dest, minlength=replicas)
    tok_of = np.bincount(dest, weights=lengths, minlength=len(n_of)).astype(np.int64)
    n_per_rank = [int(n_of[d]) if d is not None else 0 for d in replica_of_rank]
    tok_per_rank = [int(tok_of[d]) if d is not None else 0 for d in replica_of_rank]
    in_order = bool((perm == np.arange(len(perm))).all())
    if not in_order:
        idx = torch.from_numpy(perm).to(batch.offsets.device)
        _, rows = batch.token_index(idx)
    # the destinations in rank order, each once: then the sorted rows are the buffer itself
    used = [d for d in replica_of_rank if d is not None and n_of[d]]
    once = used == sorted(set(used))
    out = {}
    for f in fields:
        kind, name = f[0], f[1]
        src = batch.tokens[name] if kind == "t" else batch.samples[name]
        sorted_rows = src if in_order else src[rows if kind == "t" else idx]
        counts = tok_per_rank if kind == "t" else n_per_rank
        if not once:
            per_dest = sorted_rows.split((tok_of if kind == "t" else n_of).tolist())
            sorted_rows = torch.cat(
                [per_dest[d] for d in replica_of_rank if d is not None and n_of[d]]
            )
        out[name] = (_as_rows(sorted_rows.to(device)), counts)
    return out


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, row bytes] uint8 view of a contiguous tensor (what all_to_all_single splits)."""
    return t.contiguous().reshape(len(t), -1).view(torch.uint8)


def _send_objects(batch: Batch, order: list[np.ndarray], names: list[str]) -> list[bytes]:
    """One JSON document per receiving rank: each object column for its samples."""
    blobs, cache = [], {}
    for o in order:
        key = o.tobytes()
        if key not in cache:
            index = o.tolist()
            cache[key] = json.dumps([[batch.objects[k][i] for i in index] for k in names]).encode()
        blobs.append(cache[key] if len(o) else b"")
    return blobs


def _exchange_objects(blobs: list[bytes], device: torch.device) -> list[bytes]:
    """Variable-size byte strings, one per peer, both ways: sizes first, then the bytes."""
    world = dist.get_world_size()
    send_sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64, device=device)
    recv_sizes = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_to_all_single(recv_sizes, send_sizes)
    sizes = recv_sizes.tolist()
    out = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    raw = b"".join(blobs)
    inp = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device) if raw else out[:0]
    dist.all_to_all_single(out, inp, sizes, [len(b) for b in blobs])
    data = bytes(out.cpu().numpy())
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    return pieces


_groups: dict[tuple[tuple[int, ...], timedelta], dist.ProcessGroup] = {}


def _group(ranks: list[int], timeout: timedelta) -> dist.ProcessGroup:
    """A process group over `ranks`, made once, by every rank (new_group is collective),
    with the run's collective timeout."""
    key = (tuple(ranks), timeout)
    if key not in _groups:
        _groups[key] = dist.new_group(ranks, timeout=timeout)
    return _groups[key]


class Transfer:
    """One redistribution, sent in rounds: fields that are final can leave (asynchronously)
    while a later stage still writes others; `finish` waits and returns the destination
    batch. The first round learns the lengths and groups and plans; every
    round agrees on its fields' schema. Every rank makes the same calls in the same order
    (a rank without a batch passes None). `redistribute` is one round, then finish."""

    def __init__(
        self,
        src: Layout,
        dst: Layout,
        balance: Balance,
        device: torch.device,
        timeout: timedelta,
        pattern: Pattern = Pattern.AUTO,
        phases: dict[str, float] | None = None,
    ) -> None:
        assert src.world_size == dst.world_size == dist.get_world_size(), (src, dst)
        assert movement(src, dst) is not Move.NONE, "nothing moves: no transfer needed"
        self.src, self.dst, self.balance, self.pattern = src, dst, balance, pattern
        self.device, self.timeout, self.clock = device, timeout, _Clock(phases, device)
        self.rank, self.senders = dist.get_rank(), src.emitters()
        self.sent: set[str] = set()
        self.rounds: list[tuple[list[Field], dict[str, torch.Tensor], torch.Tensor]] = []
        self.works: list = []
        self.objects: dict[str, list] = {}
        self.busy_ns = 0

    def send(self, batch: Batch | None, names: Collection[str] | None = None) -> None:
        """Start moving the fields of `batch` in `names` (all when None) not sent yet;
        `uid` and `group` go in the first round."""
        rank, world, senders = self.rank, dist.get_world_size(), self.senders
        first = not self.rounds
        self.clock.restart()
        begin = time.perf_counter_ns()
        if batch is not None:
            wanted = set(names if names is not None else batch.names()) - self.sent
            batch = batch.only(wanted)
        meta = _exchange_meta(batch, senders, self.device, self.sent)
        self.clock("meta")
        if first:
            begin = time.perf_counter_ns()  # the ranks are in step from here
            self.meta = meta
            self.plan = _plan(meta, senders, self.src, self.dst, self.balance, self.pattern)
            self._receive_plan()
            self.clock("plan")
        plan, fields = self.plan, meta.fields
        self.sent |= {f[1] for f in fields} | set(meta.objects)
        if rank in senders and fields:
            order = [self.replica_of.get(r) for r in range(world)]
            send = _send_buffers(batch, plan.dest[rank], order, self.dst.dp, fields, self.device)
        self.clock("pack")
        totals = (int(self.lengths.sum()), len(self.lengths))
        sizes = [_aligned(totals[f[0] == "s"] * _row_bytes(f)) for f in fields]
        recv = torch.empty(sum(sizes) if self.holding else 0, dtype=torch.uint8, device=self.device)
        views, pos = {}, 0
        for f, size in zip(fields, sizes, strict=True):
            rows = totals[f[0] == "s"]
            views[f[1]] = recv[pos : pos + rows * _row_bytes(f)].view(rows, _row_bytes(f))
            pos += size
        if meta.objects:  # small, synchronous, first: then nothing waits behind the fields
            blobs = [b""] * world
            if rank in senders:
                to_holders = [self._samples_for(rank, r, self.holder_of) for r in range(world)]
                blobs = _send_objects(batch, to_holders, meta.objects)
            pieces = [json.loads(p) for p in _exchange_objects(blobs, self.device) if p]
            self.objects |= {
                k: [x for p in pieces for x in p[j]] for j, k in enumerate(meta.objects)
            }
        receiving = rank in self.replica_of
        for f in fields:  # every field in flight at once: the backend pipelines them
            per_sender = self.tokens if f[0] == "t" else self.counts
            in_splits = [per_sender.get(s, 0) if receiving else 0 for s in range(world)]
            out_t, out_splits = send[f[1]] if rank in senders else (views[f[1]][:0], [0] * world)
            target = views[f[1]] if receiving else views[f[1]][:0]
            self.works.append(
                dist.all_to_all_single(
                    target, out_t.to(self.device), in_splits, out_splits, async_op=True
                )
            )
        self.rounds.append((fields, views, recv))
        self.clock("exchange")
        self.busy_ns += time.perf_counter_ns() - begin

    def _samples_for(self, s: int, r: int, to: dict[int, int]) -> np.ndarray:
        """Sender s's samples for rank r, in the sender's order."""
        return np.flatnonzero(self.plan.dest[s] == to[r]) if r in to else np.zeros(0, np.int64)

    def _receive_plan(self) -> None:
        """What this rank receives: per sender, its samples for this rank's replica."""
        plan, meta, rank = self.plan, self.meta, self.rank
        self.replica_of = {r: d for d, rs in enumerate(plan.recipients) for r in rs}
        self.holder_of = {r: d for d, rs in enumerate(plan.holders) for r in rs}
        incoming = {s: self._samples_for(s, rank, self.replica_of) for s in self.senders}
        self.counts = {s: len(incoming[s]) for s in self.senders}
        self.tokens = {s: int(meta.lengths[s][incoming[s]].sum()) for s in self.senders}
        self.d = self.dst.coords(rank)["dp"]
        self.holding = rank in plan.holders[self.d]
        # a LEADERS follower learns its replica's samples from the leader's view
        view = plan.recipients[self.d][0] if self.holding else rank
        self.lengths = np.concatenate(
            [meta.lengths[s][self._samples_for(s, view, self.replica_of)] for s in self.senders]
        )

    def finish(self) -> Batch | None:
        """Wait for every round; this rank's destination batch (None on a rank holding none)."""
        assert self.rounds, "send before finish"
        self.clock.restart()
        begin = time.perf_counter_ns()
        for work in self.works:
            work.wait()
        self.clock("exchange")
        if self.plan.pattern is Pattern.LEADERS:
            # every rank makes every replica's group, in the same order (new_group is
            # collective); the leader's buffers reach the rest of its replica
            holders = self.plan.holders
            groups = [_group(h, self.timeout) if len(h) > 1 else None for h in holders]
            if self.holding and groups[self.d] is not None:
                for _, _, recv in self.rounds:
                    dist.broadcast(recv, src=self.plan.recipients[self.d][0], group=groups[self.d])
        self.clock("broadcast")
        out = None
        if self.holding:
            offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64, device=self.device)
            offsets[1:] = torch.from_numpy(self.lengths).to(self.device).cumsum(0)
            fields: dict[str, dict[str, torch.Tensor]] = {"t": {}, "s": {}}
            for round_fields, views, _ in self.rounds:
                for kind, name, dtype, shape in round_fields:
                    rows = views[name].view(getattr(torch, dtype))
                    fields[kind][name] = rows.view(len(rows), *shape)
            out = Batch(offsets, fields["t"], fields["s"], self.objects)
        self.clock("unpack")
        # AUTO's measure: the time spent in this transfer's calls (a stage running between
        # them hides the rest), on this rank
        _measured.elapsed_ns = self.busy_ns + time.perf_counter_ns() - begin
        return out


def redistribute(
    batch: Batch | None,
    src: Layout,
    dst: Layout,
    balance: Balance,
    device: torch.device,
    timeout: timedelta,
    keep: Collection[str] | None = None,
    pattern: Pattern = Pattern.AUTO,
    phases: dict[str, float] | None = None,
) -> Batch | None:
    """Called on every rank. `batch` is this rank's source-replica batch (only the
    replica's emitter's copy is read; other ranks may pass None). Returns this rank's
    destination-replica batch on `device`, the same on every rank of the replica (None on
    a rank that holds none). Only the fields in `keep` (all when None; `uid` and `group`
    always) arrive. New process groups get `timeout`; `phases` collects seconds per phase
    (meta, plan, pack, exchange, broadcast, unpack)."""
    if movement(src, dst) is Move.NONE:
        rank = dist.get_rank()
        assert batch is not None or rank not in dst.holders(), "holders hold their batch"
        if batch is None or rank not in dst.holders():
            return None
        return batch if keep is None else batch.only(keep)
    transfer = Transfer(src, dst, balance, device, timeout, pattern, phases)
    transfer.send(batch, keep)
    return transfer.finish()
