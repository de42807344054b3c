"""Weights from a train rank to rollout ranks that hold no model replica of their own
(rollout.placement=SEPARATE): the exported HF-named buckets, each as one flat broadcast
over a process group of the source and the rollout ranks (NCCL on GPU, gloo on CPU).

A bucket goes as two collectives: its (name, shape, dtype) list as an object broadcast
(None ends the stream), then every tensor's bytes in one buffer. The receivers rebuild the
tensors as views of that buffer and hand each bucket to their engine as it arrives, so a
rank holds at most one bucket beyond its engine's weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from distflow_mc.rollout.engine import Bucket

ALIGN = 8  # bytes: every tensor is viewed in place in the received buffer


def stream_buckets(
    buckets: Iterable[Bucket] | None, src: int, group: dist.ProcessGroup, device: torch.device
) -> Iterator[Bucket]:
    """Called on every rank of `group`: the source (`src`, a global rank) passes its
    buckets, the others None; every rank gets every bucket, in order."""
    own = iter(buckets) if buckets is not None else None
    while True:
        bucket = next(own, None) if own is not None else None
        meta = [[(n, tuple(t.shape), t.dtype) for n, t in bucket] if bucket is not None else None]
        dist.broadcast_object_list(meta, src=src, group=group)
        if meta[0] is None:
            return
        sizes = [dtype.itemsize * torch.Size(shape).numel() for _, shape, dtype in meta[0]]
        spans = [-(-n // ALIGN) * ALIGN for n in sizes]  # each tensor starts aligned
        flat = torch.zeros(sum(spans), dtype=torch.uint8, device=device)
        parts = flat.split(spans)
        if bucket is not None:
            for part, n, (_, t) in zip(parts, sizes, bucket, strict=True):
                part[:n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        dist.broadcast(flat, src=src, group=group)
        if bucket is None:
            bucket = [
                (name, part[:n].view(dtype).view(shape))
                for (name, shape, dtype), part, n in zip(meta[0], parts, sizes, strict=True)
            ]
        yield bucket
