"""Context parallelism (parallel.cp = C) on the local layer spec: each rank of a CP group
holds its chunks of every sample's two segments (data/chunks.py: chunks i and 2C - 1 - i),
with their true positions. Attention gathers K and V over the group (`attention`, one
all-gather; its backward reduce-scatters their gradients); each of the rank's chunks
attends to its segment's chunks before it in full and to itself causally, after the
whole segment it continues (a sample's prompt part, or its group's shared one): fused
kernels merged by their log-sum-exp, no mask (`Pieces`, `tail_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from distflow_mc.models.spans import once


def _key_order(size: int, c: int, start: int, length: int, device: torch.device) -> torch.Tensor:
    """Where the 2 x size x c tokens of a segment, in order, lie in a gather of every
    rank's [length] row (rank after rank) whose own tokens of it start at `start`."""
    o = torch.arange(2 * size * c, device=device)
    block, within = o // c, o % c
    second = block >= size
    rank = torch.where(second, 2 * size - 1 - block, block)
    return rank * length + start + torch.where(second, c + within, within)


@dataclass(frozen=True)
class Pieces:
    """A CP micro-batch's attention plan, made once for every layer: per row, its segments
    (runs of one span: its own 2c tokens of a segment, c of each chunk) and each one's keys
    in the gather, in segment order (`keys`), with the real keys of the segment it
    continues (`prefix`), and this rank's two query chunks, each seeing its segment's keys
    up to its own end: a lower-right causal attention (`tail_attention`). The rows' padding
    (span 0) attends within itself, in its own part of the gather: every rank's output then
    depends on the gathered K and V, so every rank's backward takes part in the gather's
    reduce-scatter (a rank whose tokens were all padding would otherwise skip it)."""

    # per row: (first local token, tokens, keys, prefix keys or None, key counts per chunk)
    rows: tuple[tuple[tuple[int, int, torch.Tensor, torch.Tensor | None, tuple], ...], ...]

    @staticmethod
    def build(
        spans: torch.Tensor,
        prefixes: torch.Tensor,
        positions: torch.Tensor,
        size: int,
        rank: int,
    ) -> Pieces:
        """[b, local] `spans` of the rank's tokens (0: padding), `prefixes` (the span each
        one's span continues, 0: none) and true `positions` (a segment's own c tokens of a
        chunk start at its first position + rank x c: the span's start is known from any
        rank, and the real tokens of the span it continues are those before it)."""
        length, device = spans.size(1), spans.device
        rows = []
        for r in range(spans.size(0)):
            ids, counts = torch.unique_consecutive(spans[r], return_counts=True)
            starts = (counts.cumsum(0) - counts).tolist()
            where = {}  # span -> (its first position, its keys)
            runs = []
            for span, at, n in zip(ids.tolist(), starts, counts.tolist(), strict=True):
                if span == 0:  # padding: its own tokens of the gather, causally
                    keys = rank * length + torch.arange(at, at + n, device=device)
                    runs.append((at, n, keys, None, (n,)))
                    continue
                c = n // 2
                first = int(positions[r, at]) - rank * c
                keys = _key_order(size, c, at, length, device)
                where[span] = (first, keys)
                prefix = None
                if (p := int(prefixes[r, at])) > 0:
                    p_first, p_keys = where[p]
                    prefix = p_keys[: first - p_first]
                runs.append((at, n, keys, prefix, ((rank + 1) * c, (2 * size - rank) * c)))
            rows.append(tuple(runs))
        return Pieces(tuple(rows))

    def attention(self, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [b, heads, local, d]; kv: every rank's K then V heads, gathered."""
        heads = kv.size(1) // 2
        rows = []
        for r, runs in enumerate(self.rows):
            parts = []
            for at, n, keys, prefix, ends in runs:
                own = kv[r : r + 1].index_select(2, keys)
                pre = None if prefix is None else kv[r : r + 1].index_select(2, prefix)
                step = n // len(ends)
                for i, end in enumerate(ends):
                    seen = own[:, :, :end] if pre is None else torch.cat([pre, own[:, :, :end]], 2)
                    k, v = seen.split(heads, dim=1)
                    mine = q[r : r + 1, :, at + i * step : at + (i + 1) * step]
                    parts.append(tail_attention(mine, k, v, scale))
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    scale: float,
    plan: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of this rank's chunks (q, k, v: [b, heads, local, d], K/V heads
    fewer under GQA) to their whole segments: K and V gathered over the group in one
    collective (only the KV heads travel), then the micro-batch's `Pieces` (`plan`: its
    spans, prefixes and positions stacked, [3, b, local]: a tensor, which megatron's full
    recompute can save). -> [b, heads, local, d]"""
    where = (dist.get_world_size(group), dist.get_rank(group))
    pieces = once(plan, lambda: Pieces.build(*plan, *where))
    return pieces.attention(q, gather(torch.cat([k, v], dim=1), group), scale)


def tail_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of queries that are the last q.size(2) positions of the keys
    (lower-right alignment). On the GPU torch's fused kernels take that alignment as is; on
    the CPU the keys before the queries' own block and the block itself (a square causal
    one) run as two fused kernels, merged by their log-sum-exp (no [queries, keys] mask)."""
    return _Tail.apply(q, k, v, scale) if q.device.type == "cpu" else _lower_right(q, k, v, scale)


def _lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """(torch takes its flash kernel for this alignment when its checks pass, GQA included:
    bf16/fp16 on CUDA; otherwise it attends with the mask made out)."""
    bias = causal_lower_right(q.size(2), k.size(2))
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


_forward_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _Tail(torch.autograd.Function):
    """The CPU's lower-right causal attention. The backward runs each kernel's own backward
    with the merged output and log-sum-exp (what ring attention does): the softmax each
    block recomputes is then the whole row's."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        before = k.size(2) - q.size(2)  # keys seen in full
        out, lse = _forward_cpu(q, k[:, :, before:], v[:, :, before:], 0.0, True, scale=scale)
        if before:
            out_b, lse_b = _forward_cpu(q, k[:, :, :before], v[:, :, :before], 0.0, scale=scale)
            merged = torch.logaddexp(lse, lse_b)
            out = (
                out.float() * torch.exp(lse - merged)[..., None]
                + out_b.float() * torch.exp(lse_b - merged)[..., None]
            ).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.before = scale, before
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        b, scale = ctx.before, ctx.scale
        dq, dk, dv = _backward_cpu(
            grad, q, k[:, :, b:], v[:, :, b:], out, lse, 0.0, True, scale=scale
        )
        if b:
            dq_b, dk_b, dv_b = _backward_cpu(
                grad, q, k[:, :, :b], v[:, :, :b], out, lse, 0.0, False, scale=scale
            )
            dq, dk, dv = dq + dq_b, torch.cat([dk_b, dk], dim=2), torch.cat([dv_b, dv], dim=2)
        return dq, dk, dv, None


def gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, heads, local, d] from every rank of the group -> [b, heads, full, d], in rank
    order; the backward sums each part's gradient onto its rank (a reduce-scatter)."""
    return _Gather.apply(t, group)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # each rank's part summed over the group onto that rank alone (reduce-scatter)
        parts = grad.unflatten(2, (dist.get_world_size(ctx.group), -1)).movedim(2, 0)
        mine = torch.empty_like(parts[0], memory_format=torch.contiguous_format)
        dist.reduce_scatter_tensor(mine, parts.flatten(0, 1).contiguous(), group=ctx.group)
        return mine, None
