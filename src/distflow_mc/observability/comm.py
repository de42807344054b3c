"""What this rank's collectives move, per phase: calls, bytes sent and received, seconds.

Bytes are counted as direct delivery, independent of the algorithm a backend picks: a
piece of data that rank a must hand to rank b counts once as sent by a and once as
received by b (a broadcast of B bytes to W ranks: the source sends (W - 1) x B, each other
rank receives B; an all-gather: each rank sends its part to the W - 1 others and receives
theirs; an all-reduce: as an all-gather of every rank's tensor). So over a group the bytes
sent equal the bytes received, and a link model turns them into time for ring, tree or
pairwise algorithms (scripts/scale_model.py). Object collectives (all_gather_object,
broadcast_object_list) are counted through the tensor collectives they are made of.
Seconds are wall time in the call (the launch only, for an asynchronous one).

    counter = CommCounter()
    with counter.installed(), counter.phase("redistribute"):
        redistribute(...)
    counter.rows  # {(phase, collective): Counts}
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


@dataclass
class Counts:
    calls: int = 0
    sent: int = 0
    received: int = 0
    seconds: float = 0.0


def _bytes(t: torch.Tensor | list[torch.Tensor]) -> int:
    if isinstance(t, list | tuple):
        return sum(_bytes(x) for x in t)
    return t.numel() * t.element_size()


def _split(t: torch.Tensor, splits: list[int] | None, world: int, index: int) -> int:
    """Bytes of part `index` of `t` cut along dim 0 by `splits` (equal parts when None)."""
    rows = splits[index] if splits else t.shape[0] // world
    return rows * (t[0].numel() if t.dim() and t.shape[0] else 0) * t.element_size()


def _world_and_rank(group: Any) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _sizes(name: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(sent, received) by this rank for one call of collective `name`."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name == "broadcast":
        t, src, group = arg(0, "tensor"), arg(1, "src"), arg(2, "group")
        world, rank = _world_and_rank(group)
        mine = dist.get_rank() == src if src is not None else rank == kwargs.get("group_src")
        return (_bytes(t) * (world - 1), 0) if mine else (0, _bytes(t))
    if name == "all_gather":
        out, t, group = arg(0, "tensor_list"), arg(1, "tensor"), arg(2, "group")
        world, _ = _world_and_rank(group)
        return _bytes(t) * (world - 1), _bytes(out) - _bytes(t)
    if name == "all_gather_single":  # (all_gather_into_tensor calls it)
        out, t, group = arg(0, "output_tensor"), arg(1, "input_tensor"), arg(2, "group")
        world, _ = _world_and_rank(group)
        return _bytes(t) * (world - 1), _bytes(out) - _bytes(t)
    if name == "all_to_all_single":
        out, t = arg(0, "output"), arg(1, "input")
        out_splits, in_splits = arg(2, "output_split_sizes"), arg(3, "input_split_sizes")
        world, rank = _world_and_rank(arg(4, "group"))
        own_in, own_out = _split(t, in_splits, world, rank), _split(out, out_splits, world, rank)
        return _bytes(t) - own_in, _bytes(out) - own_out
    if name == "all_reduce":
        t, group = arg(0, "tensor"), arg(2, "group")
        world, _ = _world_and_rank(group)
        return _bytes(t) * (world - 1), _bytes(t) * (world - 1)
    if name == "reduce_scatter_single":  # (reduce_scatter_tensor calls it)
        out, t, group = arg(0, "output"), arg(1, "input"), arg(3, "group")
        world, _ = _world_and_rank(group)
        return _bytes(t) - _bytes(out), _bytes(out) * (world - 1)
    raise ValueError(f"no byte count for {name}")


COUNTED = (
    "broadcast",
    "all_gather",
    "all_gather_single",
    "all_to_all_single",
    "all_reduce",
    "reduce_scatter_single",
)


class CommCounter:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Counts] = defaultdict(Counts)
        self.current = "other"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    @contextmanager
    def installed(self) -> Iterator[CommCounter]:
        """Count every collective this process makes (through torch.distributed and its
        c10d module, which the object collectives call) until the block ends."""
        originals = {name: getattr(c10d, name) for name in COUNTED}
        wrapped = {name: self._wrap(name, fn) for name, fn in originals.items()}
        for name, fn in wrapped.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(c10d, name, fn)
                setattr(dist, name, fn)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            sent, received = _sizes(name, args, kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            row = self.rows[(self.current, name)]
            row.calls += 1
            row.sent += sent
            row.received += received
            row.seconds += time.perf_counter() - start
            return out

        return counted

    def by_phase(self) -> dict[str, Counts]:
        out: dict[str, Counts] = defaultdict(Counts)
        for (phase, _), c in self.rows.items():
            total = out[phase]
            total.calls += c.calls
            total.sent += c.sent
            total.received += c.received
            total.seconds += c.seconds
        return dict(out)
