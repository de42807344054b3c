"""Move a batch from one parallel layout to another with collectives: no central process.

    rollout DP=4 x TP=1  ->  train DP=2 x TP=2

One rank per source replica (its emitter) sends. Every rank learns every sample's length
and group (and, when objects travel, each sample's encoded size) from one fixed-layout
integer all-gather and computes the same balanced assignment. Two packings, chosen by
measured cost: CHUNKS moves a round in one `all_to_all_single` (a sender's chunk for a
destination replica holds its samples field after field, each 8-byte aligned and gathered
in place with one `index_select`; the chunk a rank keeps for itself never travels but is
written into its receive buffer; the receiver concatenates each field across senders, a
view when one sender sent it). FIELDS moves each field in its own all-to-all into its own
region of one receive buffer, so every field arrives contiguous and stays a view (no
unpacking copy). Objects (strings, dicts, a vision-language prompt's images) are pickled
per sample (one C call each, so that their sizes ride in the metadata and they need no
exchange of their own; a tensor travels as its raw bytes) and unpickled from one stream.

Two ways to reach the ranks of a destination replica, chosen by measured cost too (the same
choice on every rank): DIRECT sends every rank of the replica its copy; LEADERS sends
the replica's first rank and broadcasts inside the replica. When both layouts have the
same replicas, samples stay in their replica: nothing moves if every rank that needs the
batch holds it (`Move.NONE`), else each replica's copy reaches its other ranks.
Only the fields named in `keep` travel, and with `stages` a rank gets only the fields its
pipeline stage reads (a middle stage reads none: it gets the lengths, uids and groups; the
first reads the model's inputs); under LEADERS each set of ranks reading the same fields
has its own leader. Under context parallelism each rank of the destination receives only
its chunks of every sample: the senders cut the samples (data/chunks.py) and pack each CP
rank's own (no group prefix travels once then: a cut needs whole samples). Works on NCCL
and gloo through the same code.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import pickle
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import numpy as np
import torch
import torch.distributed as dist

from distflow_mc.data.balance import destinations
from distflow_mc.data.batch import REQUIRED_SAMPLE_FIELDS, Batch
from distflow_mc.data.chunks import cut, held, held_tokens, split
from distflow_mc.data.prefixes import PREFIX, restore, share
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


class Packing(Enum):
    AUTO = "auto"  # the faster of the two below, as measured (`_Measured`)
    CHUNKS = "chunks"  # one all-to-all per round; the receiver concatenates each field
    FIELDS = "fields"  # one all-to-all per field; the received fields are views, no copy


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
    lengths: dict[int, np.ndarray]  # sender -> per-sample token counts (first round)
    groups: dict[int, np.ndarray]  # sender -> per-sample group ids (first round)
    shared: dict[int, np.ndarray]  # sender -> per-sample tokens not sent (first round)
    # context parallelism: sender -> per-sample first segments (data/chunks.py), else 0
    firsts: dict[int, np.ndarray]
    object_bytes: dict[int, np.ndarray]  # sender -> per-sample encoded object bytes
    # a later round of per-sample fields only: sender -> their bytes, which rode along
    inline: dict[int, bytes] | None = None

    def nbytes(self) -> int:
        """Bytes of the tensor fields of all senders' batches (whole: what a move costs is
        measured per byte moved, whether a shared prefix travelled once or not)."""
        tokens = sum(int(v.sum()) for v in self.lengths.values())
        samples = sum(len(v) for v in self.lengths.values())
        return sum(_row_bytes(f) * (tokens if f[0] == "t" else samples) for f in self.fields)


HEAD = 5  # count, schema bytes, time of the last AUTO call, object entries, inline bytes
LOW, LOW_MASK = 32, (1 << 32) - 1  # a sample's length word: its tokens, then those not sent
_widths: dict[bool, int] = {}  # payload width of the last first / later round (the same everywhere)


class _Same:
    """An object a sample shares with the first sample of its group (the very object: a
    prompt's images, its data source): it travels once, with that sample."""

    def __reduce__(self) -> str:
        return "SAME"  # pickled by reference: the one instance


SAME = _Same()


def _encode_objects(batch: Batch, names: list[str], once: bool) -> list[bytes]:
    """Each sample's object columns as one pickle: a run of them for any samples is one
    stream (pickles end themselves). Ranks of one job unpickle each other's, as torch's
    own object collectives do. With `once` (groups arrive whole and in order), a value
    that is its group's first sample's own object goes as SAME (`_resolve` puts it back)."""
    columns = [batch.objects[k] for k in names]
    rows = list(zip(*columns, strict=True))
    if once and rows:
        first: dict[int, tuple] = {}
        for i, g in enumerate(batch.samples["group"].tolist()):
            head = first.setdefault(g, rows[i])
            if head is not rows[i]:
                rows[i] = tuple(SAME if v is h else v for v, h in zip(rows[i], head, strict=True))
    return [pickle.dumps(row, pickle.HIGHEST_PROTOCOL) for row in rows]


def _unpickle(data: bytes) -> list:
    """The rows `_encode_objects` pickled one by one, from their concatenation: each with an
    unpickler of its own (a pickle's memo references are its own)."""
    stream, rows = io.BytesIO(data), []
    while stream.tell() < len(data):
        rows.append(pickle.load(stream))
    return rows


def _resolve(objects: dict[str, list], groups: list[int]) -> dict[str, list]:
    """The inverse of `_encode_objects`' SAME: each from its group's first sample before it."""
    out = {}
    for name, values in objects.items():
        if not any(v is SAME for v in values):
            out[name] = values
            continue
        first: dict[int, object] = {}
        column = []
        for v, g in zip(values, groups, strict=True):
            column.append(first[g] if v is SAME else v)
            first.setdefault(g, v)
        out[name] = column
    return out


def _exchange_meta(
    batch: Batch | None,
    encoded: list[bytes],
    senders: list[int],
    device: torch.device,
    sent: set[str],
    group: dist.ProcessGroup | None,
    cp: int = 1,
) -> _Meta:
    """One int64 all-gather of a fixed-layout row per rank: [count, schema bytes, time of
    the last AUTO call, object entries, inline bytes], then (in the first round) its
    lengths (a sample's token count in the low 32 bits, in the high ones how many of them
    it does not send, being its group's common prefix: `prefixes.share`) and groups, the
    encoded object bytes of each sample (when objects travel), its schema (the fields and
    object names not `sent` yet, as JSON bytes) and, in a later round of per-sample fields
    only (a reward after the tokens), those fields' bytes: a few bytes a sample, so they
    ride along and the round needs no exchange of its own. Into a layout of `cp` > 1 no
    prefix is shared: a length's high bits carry the sample's first segment instead, and
    the schema has the cut's `labels` (data/chunks.py; each receiver makes its tokens'
    `positions` itself).
    The payload width is the last call's; when a rank's payload does not fit, every rank
    sees it in the heads and a second all-gather at the needed width follows."""
    first = not sent
    rank = dist.get_rank()
    mine = batch if rank in senders else None
    payload = np.zeros(0, dtype=np.int64)
    n, schema, n_obj, inline = 0, b"", 0, b""
    if mine is not None:
        n = len(mine)
        fields = _fields(mine) + (_cut_fields(mine) if cp > 1 else [])
        fields = sorted(f for f in fields if f[1] not in sent)
        objects = sorted(set(mine.objects) - sent)
        schema = json.dumps([fields, objects]).encode()
        shared = torch.zeros_like(mine.lengths)
        if PREFIX in mine.samples:
            shared = mine.samples[PREFIX].clamp(min=0).long()
        # whole, for the balance; in the high bits the tokens not sent (CP: the split)
        high = shared if cp == 1 else split(mine)
        words = (mine.lengths + shared) | (high << LOW)
        per_sample = [words.cpu().numpy(), mine.samples["group"].cpu().numpy()]
        sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        n_obj = len(sizes)
        if _inlined(first, fields, objects):
            inline = b"".join(_padded(_raw(mine.samples[f[1]])) for f in fields)
        words = [np.frombuffer(_padded(b), dtype=np.int64) for b in (schema, inline)]
        payload = np.concatenate([*(per_sample if first else []), sizes, *words])
    head = [n, len(schema), _measured.elapsed_ns, n_obj, len(inline)]
    width = _widths.get(first, 0)
    table = _all_gather_rows(np.array(head, dtype=np.int64), payload, width, device, group)
    counts, sizes_, elapsed, n_objs, inlines = table[:, :HEAD].T
    per = 2 * counts if first else np.zeros_like(counts)
    needed = int(max(per + n_objs + -(-sizes_ // 8) + -(-inlines // 8)))
    if needed > width:  # someone's payload did not fit: again, wide enough
        table = _all_gather_rows(np.array(head, dtype=np.int64), payload, needed, device, group)
    _widths[first] = max(width, needed)
    if first:
        _measured.update(int(elapsed.max()))
    rows = table[:, HEAD:]
    skip = per + n_objs
    schemas = {s: rows[s, skip[s] :].tobytes()[: sizes_[s]] for s in senders if sizes_[s]}
    if not schemas:
        raise ValueError("redistribute: no source replica holds a batch")
    if len(set(schemas.values())) > 1:
        raise ValueError(
            "source replicas disagree on the batch fields: "
            f"{sorted({s.decode() for s in schemas.values()})}"
        )
    fields, objects = json.loads(next(iter(schemas.values())))
    fields = [(k, n_, d, tuple(sh)) for k, n_, d, sh in fields]
    inline_at = skip + -(-sizes_ // 8)
    high = {s: rows[s, : counts[s]] >> LOW for s in senders} if first else {}
    none = {s: np.zeros_like(v) for s, v in high.items()}
    return _Meta(
        fields,
        objects,
        {s: rows[s, : counts[s]] & LOW_MASK for s in senders} if first else {},
        {s: rows[s, counts[s] : 2 * counts[s]] for s in senders} if first else {},
        high if cp == 1 else none,  # the tokens not sent
        high if cp > 1 else none,  # the first segments
        {s: rows[s, per[s] : per[s] + n_objs[s]] for s in senders},
        {s: rows[s, inline_at[s] :].tobytes()[: inlines[s]] for s in senders}
        if _inlined(first, fields, objects)
        else None,
    )


def _cut_fields(batch: Batch) -> list[Field]:
    """The field data/chunks.py's cut adds that travels: each token's next one."""
    ids = batch.tokens.get("input_ids")
    return [("t", "labels", str(ids.dtype).removeprefix("torch."), ())] if ids is not None else []


def _inlined(first: bool, fields: list[Field], objects: list[str]) -> bool:
    """A later round of per-sample tensor fields only rides in the metadata all-gather."""
    return not first and bool(fields) and not objects and all(f[0] == "s" for f in fields)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_inline(meta: _Meta, senders: list[int], dest: dict[int, np.ndarray], d: int) -> dict:
    """The per-sample fields of a round that rode in the metadata, for replica d: each
    sender's samples for d, in sender order."""
    out, at = {}, dict.fromkeys(senders, 0)
    for f in meta.fields:
        width, parts = _row_bytes(f), []
        for s in senders:
            n = len(dest[s])
            raw = np.frombuffer(meta.inline[s], dtype=np.uint8, count=n * width, offset=at[s])
            at[s] += _aligned(n * width)
            dtype = getattr(torch, f[2])  # (numpy's empty arrays have stride 0: no view)
            rows = (
                torch.from_numpy(raw.copy()).view(dtype)
                if n
                else torch.empty(0, dtype=dtype, device="cpu")
            ).view(n, *f[3])
            parts.append(rows[torch.from_numpy(dest[s] == d)])
        out[f[1]] = torch.cat(parts)
    return out


def _all_gather_rows(
    head: np.ndarray,
    payload: np.ndarray,
    width: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> np.ndarray:
    """[world, HEAD + width] int64: every rank's head and payload (cut to `width`)."""
    world = dist.get_world_size()
    row = np.zeros(HEAD + width, dtype=np.int64)
    row[:HEAD] = head
    cut = payload[:width]
    row[HEAD : HEAD + len(cut)] = cut
    out = torch.empty(world * len(row), dtype=torch.int64, device=device)
    dist.all_gather_single(out, torch.from_numpy(row).to(device), group=group)
    return out.view(world, len(row)).cpu().numpy()


View = frozenset[str] | None  # the fields a rank reads (None: all that travel)


@dataclass
class _Plan:
    dest: dict[int, np.ndarray]  # sender -> destination replica of each of its samples
    recipients: list[list[int]]  # destination replica -> the ranks the all-to-all reaches
    # destination replica -> its holders, in sets reading the same fields (a LEADERS
    # leader, the set's first rank, broadcasts to the rest of its set)
    classes: list[list[list[int]]]
    pattern: Pattern
    packing: Packing

    def owner(self, rank: int) -> int:
        """The rank whose receive buffer `rank` ends up with: its own, or its leader's."""
        return next((c[0] for cs in self.classes for c in cs if rank in c), rank)


def _classes(dst: Layout, view: Callable[[int], View]) -> tuple[list, list]:
    """Per destination replica, its holders, and its holders in sets reading the same
    fields of the same tokens (under context parallelism each rank of a CP group its own
    chunks; a LEADERS leader, a set's first rank, broadcasts to the rest of its set)."""
    holders = [sorted(set(ranks) & dst.holders()) for ranks in dst.replicas()]

    def reads(rank: int) -> tuple:
        return view(rank), dst.coords(rank)["cp"]

    classes = [
        [[r for r in h if reads(r) == v] for v in dict.fromkeys(map(reads, h))] for h in holders
    ]
    return holders, classes


def _options(
    src: Layout,
    dst: Layout,
    balance: Balance,
    pattern: Pattern,
    packing: Packing,
    share: bool | None,
    view: Callable[[int], View],
) -> tuple[tuple, list[tuple[Pattern, Packing, bool]]]:
    """The measured choice's key and the (pattern, packing, share) options open to a move,
    known before any metadata: whether a group's common prefix travels once (with groups
    kept together only) is decided before the lengths are exchanged."""
    # LEADERS differs from DIRECT where a set of ranks reading the same fields has several
    multi = any(len(c) > 1 for cs in _classes(dst, view)[1] for c in cs)
    patterns = [Pattern.DIRECT, Pattern.LEADERS] if multi else [Pattern.DIRECT]
    if pattern is not Pattern.AUTO:
        patterns = [pattern]
    packings = [Packing.CHUNKS, Packing.FIELDS] if packing is Packing.AUTO else [packing]
    shares = [False, True] if share is None else [share]
    shares = shares if balance.keep_groups and dst.cp == 1 else [False]  # (CP: see cut)
    options = [(p, k, x) for p in patterns for k in packings for x in shares]
    return (src, dst, tuple(map(view, dst.ranks))), options


def _plan(
    meta: _Meta,
    senders: list[int],
    src: Layout,
    dst: Layout,
    balance: Balance,
    pattern: Pattern,
    packing: Packing,
    view: Callable[[int], View],
) -> _Plan:
    if movement(src, dst) is not Move.EXCHANGE:  # same replicas: each keeps its samples
        dest = {s: np.full(len(meta.lengths[s]), dst.coords(s)["dp"]) for s in senders}
    else:
        lengths = np.concatenate([meta.lengths[s] for s in senders])
        groups = np.concatenate([meta.groups[s] for s in senders]) if balance.keep_groups else None
        flat = destinations(lengths, dst.dp, groups, balance.equal_counts)
        bounds = np.cumsum([0] + [len(meta.lengths[s]) for s in senders])
        dest = {s: flat[bounds[i] : bounds[i + 1]] for i, s in enumerate(senders)}
    holders, classes = _classes(dst, view)
    if pattern is Pattern.DIRECT:
        return _Plan(dest, holders, [[[r] for r in h] for h in holders], pattern, packing)
    recipients = [[c[0] for c in cs] for cs in classes]
    return _Plan(dest, recipients, classes, pattern, packing)


class _Measured:
    """AUTO's choice by measured cost: each option (pattern, packing, whether a group's
    common prefix travels once) is tried once per (source, destination, per-rank views)
    key, then the one with fewer seconds per byte of the batch (the slowest rank's, from
    the metadata exchange on, plus the prefix sharing before it) runs, its cost updated by
    every call; every `REVISIT`-th call re-measures the option measured longest ago (of
    those within `NEAR` times the best; of all every `FAR`-th: a retry costs what it
    measured), so one unlucky first measurement does not decide for good. Every rank
    reports its time of the last measured call in the next call's metadata header, so all
    ranks hold the same numbers and make the same choice. A call chooses before its
    metadata exchange (whether to share prefixes changes what it sends), so the call before
    is still being measured then: its option counts as tried."""

    REVISIT = 16
    NEAR = 2.0  # options within this factor of the best are revisited every REVISIT calls,
    FAR = 8 * REVISIT  # the others every FAR (sharing prefixes costs 4-5x on 2 CPU cores)

    def __init__(self) -> None:
        self.cost: dict[tuple, dict[tuple, float]] = {}
        self.seen: dict[tuple, dict[tuple, int]] = {}
        self.calls: dict[tuple, int] = {}
        self.current: tuple[tuple, tuple] | None = None  # this call's key and option
        self.pending: tuple[tuple, tuple, int] | None = None  # the last call's, and bytes
        self.elapsed_ns = 0  # this rank's, for the last measured call

    def update(self, slowest_ns: int) -> None:
        """At a call's metadata exchange: the slowest rank's time of the call before."""
        if self.pending is not None:
            key, option, nbytes = self.pending
            costs = self.cost.setdefault(key, {})
            value = slowest_ns / max(nbytes, 1)
            costs[option] = value if option not in costs else (costs[option] + value) / 2
        self.pending, self.elapsed_ns = None, 0

    def started(self, nbytes: int) -> None:
        """After the metadata exchange: this call, of `nbytes`, is measured next."""
        self.pending = (*self.current, nbytes) if self.current is not None else None
        self.current = None

    def choose(self, key: tuple, options: list[tuple]) -> tuple:
        self.current = None
        if len(options) == 1:  # nothing to choose: nothing to measure
            return options[0]
        costs, seen = self.cost.get(key, {}), self.seen.setdefault(key, {})
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        measuring = self.pending[1] if self.pending is not None and self.pending[0] == key else None
        untried = [o for o in options if o not in costs and o != measuring]
        if untried:
            option = untried[0]
        elif calls % self.REVISIT == 0:  # the option measured longest ago, of those near
            best = min(costs[o] for o in options if o in costs)
            near = [o for o in options if costs.get(o, best) <= self.NEAR * best]
            option = min(near if calls % self.FAR else options, key=seen.__getitem__)
        else:
            option = min((o for o in options if o in costs), key=costs.__getitem__)
        seen[option] = calls
        self.current = (key, option)
        return option


_measured = _Measured()


def _by_destination(
    batch: Batch, dest: np.ndarray, device: torch.device
) -> tuple[np.ndarray, dict[str, torch.Tensor] | None]:
    """A sender's samples ordered by destination (stable): the order, and the packed token
    rows ("t") and samples ("s") read in that order; None when they already are in it."""
    perm = np.argsort(dest, kind="stable")
    if (perm == np.arange(len(perm))).all():
        return perm, None
    idx = torch.from_numpy(perm).to(device)
    return perm, {"t": batch.token_index(idx)[1], "s": idx}


# per rank: its replica, which fields it gets, and its CP rank (which cut of the tokens)
Target = tuple[int, np.ndarray, int] | None


def _pack(
    cuts: Sequence[Batch],
    encoded: list[bytes],
    fields: list[Field],
    dest: np.ndarray,
    counts: tuple[np.ndarray, np.ndarray],
    sizes: np.ndarray,
    order: list[Target],
    own: torch.Tensor,
) -> tuple[torch.Tensor, list[int]]:
    """The send buffer and the bytes per rank: in rank order, each receiving rank's chunk
    (its replica's samples, the fields it gets one after another, then their objects, each
    8-byte aligned: `sizes` is [fields + 1, replicas]). The chunk this rank receives from
    itself is written straight into `own` (its place in the receive buffer) and not sent.
    Each field lands in place with one index_select (a copy when the samples are already
    in destination order); a chunk that several ranks receive is packed once and copied.
    `cuts`: the batch, or under context parallelism each CP rank's cut of it (the same
    samples and offsets)."""
    me = dist.get_rank()
    chunk = [None if o is None else sizes[:, o[0]] * o[1] for o in order]
    splits = [int(c.sum()) if c is not None and r != me else 0 for r, c in enumerate(chunk)]
    buf = torch.empty(sum(splits), dtype=torch.uint8, device=own.device)
    perm, rows = _by_destination(cuts[0], dest, own.device)
    n_at, t_at = (np.concatenate([[0], np.cumsum(c)]) for c in counts)

    def fill(out: torch.Tensor, d: int, wanted: np.ndarray, sized: np.ndarray, cp: int) -> None:
        batch = cuts[cp]
        starts = np.cumsum(sized) - sized  # where each field begins in the chunk
        for j, (kind, name, dtype, shape) in enumerate(fields):
            if not wanted[j]:
                continue
            lo, hi = (t_at if kind == "t" else n_at)[d : d + 2]
            at = int(starts[j])
            region = out[at : at + (hi - lo) * _row_bytes(fields[j])]
            region = region.view(getattr(torch, dtype)).view(int(hi - lo), *shape)
            src = (batch.tokens if kind == "t" else batch.samples)[name].to(own.device)
            if rows is None:
                region.copy_(src[lo:hi])
            else:
                torch.index_select(src, 0, rows[kind][lo:hi], out=region)
        if encoded and wanted[-1]:
            blob = b"".join(encoded[i] for i in perm[n_at[d] : n_at[d + 1]])
            at = int(starts[-1])
            out[at : at + len(blob)].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))

    packed: dict[tuple[int, bytes, int], torch.Tensor] = {}  # (replica, fields, cut) -> chunk
    pos = 0
    for r, (o, sized) in enumerate(zip(order, chunk, strict=True)):
        if o is None or not sized.sum():
            continue
        out = own if r == me else buf[pos : pos + splits[r]]
        pos += splits[r]
        key = (o[0], o[1].tobytes(), o[2])
        if key in packed:
            out.copy_(packed[key])
        else:
            fill(out, o[0], o[1], sized, o[2])
            packed[key] = out
    return buf, splits


def _pack_fields(
    cuts: Sequence[Batch],
    encoded: list[bytes],
    fields: list[Field],
    dest: np.ndarray,
    counts: tuple[np.ndarray, np.ndarray],
    order: list[Target],
    device: torch.device,
) -> list[tuple[torch.Tensor, list[int]]]:
    """FIELDS: per field (then the objects' bytes), the send buffer holding the rows of
    each rank that gets it, in rank order, and the bytes per rank. One index_select per
    field, none when the samples are in destination order and each replica gets it once.
    `cuts`: as for `_pack` (each CP rank's token rows from its own cut)."""
    n_of, t_of = counts
    n_at, t_at = np.cumsum(n_of) - n_of, np.cumsum(t_of) - t_of
    perm, rows = _by_destination(cuts[0], dest, device)
    every = [d for d in range(len(n_of)) if n_of[d]]
    picked: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def pick(kind: str, targets: list[int]) -> torch.Tensor:
        """This sender's rows of `kind` for `targets` (replicas), in that order."""
        key = (kind, tuple(targets))
        if key not in picked:
            at, of = (t_at, t_of) if kind == "t" else (n_at, n_of)
            spans = [torch.arange(at[d], at[d] + of[d], device=device) for d in targets]
            index = torch.cat(spans) if spans else torch.empty(0, dtype=torch.int64, device=device)
            picked[key] = index if rows is None else rows[kind][index]
        return picked[key]

    out = []
    for j, f in enumerate(fields):
        kind, name = f[0], f[1]
        reached = [o for o in order if o is not None and o[1][j] and n_of[o[0]]]
        targets = [o[0] for o in reached]
        src = (cuts[0].tokens if kind == "t" else cuts[0].samples)[name].to(device)
        if kind == "t" and len(cuts) > 1:  # each CP rank its own cut's rows
            sent = torch.cat(
                [
                    cuts[o[2]].tokens[name].to(device).index_select(0, pick(kind, [o[0]]))
                    for o in reached
                ]
                or [src[:0]]
            )
        elif rows is None and targets == every:
            sent = src
        else:
            sent = src.index_select(0, pick(kind, targets))
        per = t_of if kind == "t" else n_of
        splits = [int(per[o[0]]) * _row_bytes(f) if o is not None and o[1][j] else 0 for o in order]
        out.append((sent.contiguous().reshape(-1).view(torch.uint8), splits))
    blobs = [
        b"".join(encoded[i] for i in perm[n_at[o[0]] : n_at[o[0]] + n_of[o[0]]])
        if encoded and o is not None and o[1][-1]
        else b""
        for o in order
    ]
    raw = bytearray(b"".join(blobs))
    empty = torch.empty(0, dtype=torch.uint8, device=device)
    objects = torch.frombuffer(raw, dtype=torch.uint8).to(device) if raw else empty
    out.append((objects, [len(x) for x in blobs]))
    return out


@dataclass
class _Round:
    """One round as this rank receives it: its fields and object names, where each field
    (then the objects) from each sender begins in the receive buffer and how many bytes it
    has ([fields + 1, senders]), and the buffer."""

    fields: list[Field]
    objects: list[str]
    starts: np.ndarray | None = None
    nbytes: np.ndarray | None = None
    recv: torch.Tensor | None = None  # None: the round came with the metadata (`ready`)
    ready: dict[str, torch.Tensor] | None = None

    def _span(self, j: int) -> torch.Tensor:
        """Field j's bytes from every sender, in rank order: a view when they lie end to
        end in the buffer (FIELDS, or one sender), else one concatenation."""
        pieces = [(int(a), int(b)) for a, b in zip(self.starts[j], self.nbytes[j], strict=True)]
        pieces = [(a, b) for a, b in pieces if b]
        if not pieces:
            return self.recv[:0]
        if all(a + b == c for (a, b), (c, _) in itertools.pairwise(pieces)):
            return self.recv[pieces[0][0] : pieces[-1][0] + pieces[-1][1]]
        return torch.cat([self.recv[a : a + b] for a, b in pieces])

    def unpack(self) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
        """The fields, each contiguous across senders in rank order, and the object columns
        (one pickle stream)."""
        if self.ready is not None:
            return self.ready, {}
        out = {}
        for j, (_, name, dtype, shape) in enumerate(self.fields):
            flat = self._span(j).view(getattr(torch, dtype))
            out[name] = flat.view(flat.numel() // math.prod(shape), *shape)
        rows = _unpickle(self._span(len(self.fields)).cpu().numpy().tobytes())
        return out, {k: [r[j] for r in rows] for j, k in enumerate(self.objects)}


def _views(dst: Layout, stages: Sequence[Collection[str] | None] | None) -> Callable[[int], View]:
    """Per rank, the fields it reads: its pipeline stage's entry of `stages` (None: all)."""
    if stages is None:
        return lambda rank: None
    assert len(stages) == dst.pp, (stages, dst)
    always = {*REQUIRED_SAMPLE_FIELDS, PREFIX}  # every stage needs its samples' lengths
    frozen = [None if s is None else frozenset(s) | always for s in stages]
    return lambda rank: frozen[dst.coords(rank)["pp"]] if rank in dst.ranks else None


def _wanted(view: View, meta: _Meta) -> np.ndarray:
    """Which of a round's fields (then its objects, all or none) a rank with `view` gets."""
    names = [f[1] for f in meta.fields]
    if view is None:
        return np.ones(len(names) + 1, dtype=bool)
    objects = bool(meta.objects) and not view.isdisjoint(meta.objects)
    return np.array([n in view for n in names] + [objects])


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
    batch. The first round learns the lengths and groups and plans; every round agrees on
    its fields' schema and moves them in one all-to-all. Every rank makes the same calls in
    the same order (a rank without a batch passes None). `redistribute` is one round, then
    finish."""

    def __init__(
        self,
        src: Layout,
        dst: Layout,
        balance: Balance,
        device: torch.device,
        timeout: timedelta,
        pattern: Pattern = Pattern.AUTO,
        phases: dict[str, float] | None = None,
        packing: Packing = Packing.AUTO,
        stages: Sequence[Collection[str] | None] | None = None,
        group: dist.ProcessGroup | None = None,
        share: bool | None = None,
    ) -> None:
        """`group`: a group over the whole world (its ranks numbered as the world's) for
        this transfer's collectives, e.g. a channel of its own that a thread drives
        (rollout.placement=SEPARATE); it moves DIRECT, making no group of its own.
        `share`: whether a group's common prefix travels once (`prefixes.share`; with
        groups kept together only); None: as measured to be faster."""
        world = range(dist.get_world_size())
        assert src.ranks[-1] in world and dst.ranks[-1] in world, (src, dst)
        assert movement(src, dst) is not Move.NONE, "nothing moves: no transfer needed"
        if group is not None:
            assert dist.get_world_size(group) == len(world), "a group over the whole world"
            pattern = Pattern.DIRECT
        self.group = group
        self.view = _views(dst, stages)
        self.src, self.dst, self.balance = src, dst, balance
        self.pattern, self.packing, self.share = pattern, packing, share
        self.device, self.timeout, self.clock = device, timeout, _Clock(phases, device)
        self.rank, self.senders = dist.get_rank(), src.emitters()
        self.sent: set[str] = set()
        self.rounds: list[_Round] = []
        self.works: list = []
        self.busy_ns = 0

    def send(self, batch: Batch | None, names: Collection[str] | None = None) -> None:
        """Start moving the fields of `batch` in `names` (all when None) not sent yet;
        `uid` and `group` go in the first round."""
        rank, senders = self.rank, self.senders
        first = not self.rounds
        self.clock.restart()
        begin = time.perf_counter_ns()
        encoded: list[bytes] = []
        cuts: list[Batch] = []
        sharing = False
        if first:  # how to move: chosen before the metadata, which sharing changes
            args = (self.src, self.dst, self.balance, self.pattern, self.packing, self.share)
            key, options = _options(*args, self.view)
            self.pattern, self.packing, sharing = _measured.choose(key, options)
        if batch is not None:
            wanted = set(names if names is not None else batch.names()) - self.sent
            batch = batch.only(wanted)
            if sharing and rank in senders:
                tick = time.perf_counter_ns()
                batch = share(batch)  # a group's common prefix travels once
                self.busy_ns += time.perf_counter_ns() - tick
            if rank in senders:
                names = sorted(set(batch.objects) - self.sent)
                encoded = _encode_objects(batch, names, self.balance.keep_groups)
                cuts = [batch] if self.dst.cp == 1 else self._cut(batch, first)
        args = (senders, self.device, self.sent, self.group, self.dst.cp)
        meta = _exchange_meta(batch, encoded, *args)
        self.clock("meta")
        if first:
            begin = time.perf_counter_ns()  # the ranks are in step from here
            self.meta = meta
            _measured.started(meta.nbytes())
            args = (self.src, self.dst, self.balance, self.pattern, self.packing, self.view)
            self.plan = _plan(meta, senders, *args)
            self._receive_plan()
            self.clock("plan")
        self.sent |= {f[1] for f in meta.fields} | set(meta.objects)
        # which fields (then the objects) each rank gets: those its view names
        views = [self.view(r) for r in range(dist.get_world_size())]
        masks = {v: _wanted(v, meta) for v in set(views)}  # one per pipeline stage at most
        self.wants = [masks[v] for v in views]
        got = self.wants[rank]
        fields = [f for f, w in zip(meta.fields, got, strict=False) if w]
        if meta.inline is not None:  # it came with the metadata: nothing left to exchange
            ready = {}
            if self.holding:
                tensors = _from_inline(meta, senders, self.plan.dest, self.d)
                ready = {f[1]: tensors[f[1]].to(self.device) for f in fields}
            self.rounds.append(_Round(fields, [], ready=ready))
            self.clock("exchange")
            self.busy_ns += time.perf_counter_ns() - begin
            return
        # bytes of each field (then the objects) in each sender's chunk for each replica
        objects = np.zeros_like(self.n)
        if meta.objects:
            for i, s in enumerate(senders):
                objects[i] = np.bincount(self.plan.dest[s], meta.object_bytes[s], self.dst.dp)
        # token rows: without the shared prefixes in the first round, whole in a later one
        t = self.t if first else self.t_whole
        rows = [(t if f[0] == "t" else self.n) * _row_bytes(f) for f in meta.fields]
        nbytes = np.stack([*rows, objects])  # [fields + 1, senders, dp]
        args = (cuts, encoded, meta.fields, nbytes, t)
        chunked = self.plan.packing is Packing.CHUNKS
        recv, starts = self._send_chunks(*args) if chunked else self._send_fields(*args)
        kept = np.append(got[:-1], True)  # the objects' row stays (empty when not wanted)
        mine = (self._mine(nbytes) * got[:, None])[kept]
        names = meta.objects if got[-1] else []
        self.rounds.append(_Round(fields, names, starts[kept], mine, recv))
        self.clock("exchange")
        self.busy_ns += time.perf_counter_ns() - begin

    def _cut(self, batch: Batch, first: bool) -> list[Batch]:
        """Each CP rank's cut of a sender's round (data/chunks.py): the first round fixes
        every sample's first segment (its prompt length travels then, if at all)."""
        if first:
            self.firsts = split(batch)
        elif "prompt_length" in batch.samples:
            raise ValueError("redistribute: under CP, prompt_length travels in the first round")
        return [cut(batch, self.dst.cp, i, self.firsts) for i in range(self.dst.cp)]

    def _send_chunks(
        self,
        cuts: list[Batch],
        encoded: list[bytes],
        fields: list[Field],
        nbytes: np.ndarray,
        t: np.ndarray,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """CHUNKS: one all-to-all; this rank's receive buffer and where each field from each
        sender begins in it."""
        rank, world, senders = self.rank, dist.get_world_size(), self.senders
        receiving = rank in self.replica_of
        sizes = -(-nbytes // ALIGN) * ALIGN
        mine = self._mine(sizes) * self.wants[rank][:, None]
        chunks = mine.sum(0)
        # the receive buffer: the senders' chunks in rank order, the buffer's owner's own
        # chunk last (it never travels); a LEADERS follower's is its leader's buffer
        owner = self.plan.owner(rank)
        placed = [i for i, s in enumerate(senders) if s != owner]
        placed += [i for i, s in enumerate(senders) if s == owner]
        where = np.zeros(len(senders), dtype=np.int64)
        where[placed] = np.cumsum(chunks[placed]) - chunks[placed]
        size = int(chunks.sum()) if self.holding else 0
        recv = torch.empty(size, dtype=torch.uint8, device=self.device)
        send, out_splits, kept = recv[:0], [0] * world, 0
        if rank in senders:
            me, dest = senders.index(rank), self.plan.dest[rank]
            kept = int(chunks[me]) if receiving else 0
            own = recv[size - kept :]
            counts = (self.n[me], t[me])
            order = self._targets()
            send, out_splits = _pack(cuts, encoded, fields, dest, counts, sizes[:, me], order, own)
        self.clock("pack")
        in_splits = [0] * world
        if receiving:
            for i, s in enumerate(senders):
                in_splits[s] = int(chunks[i]) if s != rank else 0
        target = recv[: size - kept] if receiving else recv[:0]
        self.works.append(
            dist.all_to_all_single(
                target, send, in_splits, out_splits, group=self.group, async_op=True
            )
        )
        field_at = np.cumsum(mine, axis=0) - mine
        return recv, where + field_at

    def _send_fields(
        self,
        cuts: list[Batch],
        encoded: list[bytes],
        fields: list[Field],
        nbytes: np.ndarray,
        t: np.ndarray,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """FIELDS: one all-to-all per field (and one for the objects when they travel), each
        into its own 8-byte aligned region of the receive buffer, the senders end to end:
        every field arrives contiguous. This rank's receive buffer and where each field from
        each sender begins in it."""
        rank, world, senders = self.rank, dist.get_world_size(), self.senders
        receiving = rank in self.replica_of
        mine = self._mine(nbytes) * self.wants[rank][:, None]  # [fields + 1, senders]
        total = mine.sum(1)
        region = -(-total // ALIGN) * ALIGN
        region_at = np.cumsum(region) - region
        size = int(region.sum()) if self.holding else 0
        recv = torch.empty(size, dtype=torch.uint8, device=self.device)
        parts = [(recv[:0], [0] * world)] * len(mine)
        if rank in senders:
            me, dest = senders.index(rank), self.plan.dest[rank]
            counts = (self.n[me], t[me])
            parts = _pack_fields(cuts, encoded, fields, dest, counts, self._targets(), self.device)
        self.clock("pack")
        for j, (send, out_splits) in enumerate(parts):
            if j == len(fields) and not nbytes[j].any():
                break  # no objects in this round (every rank knows every sender's sizes)
            in_splits = [0] * world
            if receiving:
                for i, s in enumerate(senders):
                    in_splits[s] = int(mine[j, i])
            lo = int(region_at[j])
            target = recv[lo : lo + int(total[j])] if receiving else recv[:0]
            self.works.append(
                dist.all_to_all_single(
                    target, send, in_splits, out_splits, group=self.group, async_op=True
                )
            )
        return recv, region_at[:, None] + np.cumsum(mine, axis=1) - mine

    def _mine(self, nbytes: np.ndarray) -> np.ndarray:
        """[fields + 1, senders] of `nbytes` for this rank's destination replica (none
        outside the destination layout)."""
        return nbytes[:, :, self.d] if self.d is not None else np.zeros_like(nbytes[:, :, 0])

    def _targets(self) -> list[Target]:
        """Per rank: the replica it receives for, the fields it gets and its CP rank (None:
        not reached)."""
        world = dist.get_world_size()
        return [
            (self.replica_of[r], self.wants[r], self.dst.coords(r)["cp"])
            if r in self.replica_of
            else None
            for r in range(world)
        ]

    def _receive_plan(self) -> None:
        """Samples and tokens from every sender to every replica, and what this rank holds:
        per sender, its samples for this rank's replica, in the sender's order."""
        plan, meta, rank, dp = self.plan, self.meta, self.rank, self.dst.dp
        self.replica_of = {r: d for d, rs in enumerate(plan.recipients) for r in rs}
        self.n = np.stack([np.bincount(plan.dest[s], minlength=dp) for s in self.senders])

        def tokens(lengths: dict[int, np.ndarray]) -> np.ndarray:
            return np.stack(
                [np.bincount(plan.dest[s], lengths[s], dp).astype(np.int64) for s in self.senders]
            )

        if self.dst.cp == 1:
            sent = {s: meta.lengths[s] - meta.shared[s] for s in self.senders}
            self.t, self.t_whole = tokens(sent), tokens(meta.lengths)
        else:  # every round's tokens: each rank's cut (data/chunks.py)
            cp = self.dst.cp
            sent = {s: held_tokens(meta.lengths[s], meta.firsts[s], cp) for s in self.senders}
            self.t = self.t_whole = tokens(sent)
        # this rank's destination replica (None: a rank outside the destination layout)
        self.d = self.dst.coords(rank)["dp"] if rank in self.dst.ranks else None
        self.holding = self.d is not None and any(rank in c for c in plan.classes[self.d])
        mine = {s: plan.dest[s] == self.d for s in self.senders}
        none = [np.zeros(0, dtype=np.int64)]
        self.lengths = np.concatenate(  # as sent: restored by `finish`
            [sent[s][mine[s]] for s in self.senders] if self.d is not None else none
        )
        # under CP, each sample's whole length and first segment: its tokens' positions
        self.whole = [
            np.concatenate([v[s][mine[s]] for s in self.senders] if self.d is not None else none)
            for v in (meta.lengths, meta.firsts)
        ]

    def finish(self) -> Batch | None:
        """Wait for every round; this rank's destination batch (None on a rank holding none)."""
        assert self.rounds, "send before finish"
        self.clock.restart()
        begin = time.perf_counter_ns()
        for work in self.works:
            work.wait()
        self.works = []  # the send buffers go
        self.clock("exchange")
        if self.plan.pattern is Pattern.LEADERS:
            # every rank makes every set's group, in the same order (new_group is
            # collective); a leader's buffers reach the rest of its set
            for c in itertools.chain.from_iterable(self.plan.classes):
                group = _group(c, self.timeout) if len(c) > 1 else None
                if group is None or self.rank not in c:
                    continue
                for r in self.rounds:
                    if r.recv is not None:  # a round that came with the metadata is here
                        dist.broadcast(r.recv, src=c[0], group=group)
        self.clock("broadcast")
        out = None
        if self.holding:
            offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64, device=self.device)
            offsets[1:] = torch.from_numpy(self.lengths).to(self.device).cumsum(0)
            parts = []  # per round: its token fields, sample fields, objects
            for r in self.rounds:
                tensors, columns = r.unpack()
                kinds = {k: {n: tensors[n] for k_, n, _, _ in r.fields if k_ == k} for k in "ts"}
                parts.append((kinds["t"], kinds["s"], columns))
            # the first round's token fields left the shared prefixes out; a later round's
            # came whole
            out = Batch(offsets, *parts[0])
            out = restore(out) if PREFIX in out.samples else out
            for tokens, samples, columns in parts[1:]:
                out = Batch(
                    out.offsets, out.tokens | tokens, out.samples | samples, out.objects | columns
                )
            out.objects = _resolve(out.objects, out.samples["group"].tolist())
            if self.dst.cp > 1:  # the true positions of the tokens this rank holds
                whole = [torch.from_numpy(v).to(self.device) for v in self.whole]
                cp = self.dst.coords(self.rank)["cp"]
                out.tokens["positions"] = held(*whole, self.dst.cp, cp)[1]
        self.clock("unpack")
        # AUTO's measure: the time spent in this transfer's calls (a stage running between
        # them hides the rest), on this rank
        _measured.elapsed_ns = self.busy_ns + time.perf_counter_ns() - begin
        return out


def _chunks_of(batch: Batch, dst: Layout, rank: int) -> Batch:
    """What a rank of `dst` keeps of its replica's batch when nothing moves: under context
    parallelism, its chunks of every sample (data/chunks.py)."""
    return batch if dst.cp == 1 else cut(batch, dst.cp, dst.coords(rank)["cp"])


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
    packing: Packing = Packing.AUTO,
    stages: Sequence[Collection[str] | None] | None = None,
    group: dist.ProcessGroup | None = None,
    share: bool | None = None,
) -> Batch | None:
    """Called on every rank. `batch` is this rank's source-replica batch (only the replica's
    emitter's copy is read; other ranks may pass None). Returns its destination
    replica's batch on `device`, the same on every rank of the replica (under context
    parallelism, each rank's chunks of it; None on a rank that holds none). Only the fields
    in `keep` (all when None; `uid` and `group` always) arrive, and with `stages` (per
    pipeline stage of `dst`: the fields its ranks read, None: all) only those of them a
    rank's stage reads. New process groups get `timeout`; `phases` collects seconds per
    phase (meta, plan, pack, exchange, broadcast, unpack). `pattern` and `packing` left AUTO
    (and `share` None) are chosen by measured cost; `group`, `share`: see `Transfer`."""
    if movement(src, dst) is Move.NONE:
        rank = dist.get_rank()
        assert batch is not None or rank not in dst.holders(), "holders hold their batch"
        if batch is None or rank not in dst.holders():
            return None
        names = set(batch.names() if keep is None else keep)
        view = _views(dst, stages)(rank)
        batch = batch.only(names if view is None else names & view)  # itself if all stay
        return _chunks_of(batch, dst, rank)
    args = (pattern, phases, packing, stages, group, share)
    transfer = Transfer(src, dst, balance, device, timeout, *args)
    transfer.send(batch, keep)
    return transfer.finish()
