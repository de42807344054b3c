"""Context parallelism (parallel.cp = C) on the local layer spec: each rank of a CP group
holds two of the 2C chunks of every row (chunks i and 2C - 1 - i, megatron's balance for
causal attention), with its tokens' true positions; attention gathers K and V over the
group (`attention`): each chunk attends to the chunks before it in full and to itself
causally, two fused kernels merged by their log-sum-exp, with no mask; in packed and
shared-prefix rows each run of a span's tokens within a chunk attends so to its span and
the span it continues (`Pieces`).

    [ c0 | c1 | c2 | c3 ]  C = 2: rank 0 holds c0 and c3, rank 1 holds c1 and c2

A micro-batch's view for this rank (`view`): every [b, s] tensor cut to its chunks, the
labels (the next token) and the fields the losses read taken at the predicting position
before the cut (a token's loss needs the output of the position before it, which may sit on
another rank), so a loss needs no neighbour. Forward-only outputs come back whole
(`unview`): gathered over the group, put back in order, moved onto the token they describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

# what a view keeps at its own position: the model's inputs (packed or shared-prefix rows:
# each token's position in its sample, its span and the span its span continues)
INPUTS = ("input_ids", "attention_mask", "positions", "spans", "prefixes")


def chunks(size: int, rank: int, length: int) -> torch.Tensor:
    """The positions rank `rank` of `size` holds of a row of `length` (a multiple of
    2 x size)."""
    c = length // (2 * size)
    last = 2 * size - 1 - rank
    return torch.cat(
        [torch.arange(rank * c, (rank + 1) * c), torch.arange(last * c, (last + 1) * c)]
    )


def _gathered_order(size: int, length: int) -> torch.Tensor:
    """The row positions of a gather over the group: every rank's chunks, in rank order."""
    return torch.cat([chunks(size, r, length) for r in range(size)])


@dataclass(frozen=True)
class Pieces:
    """Packed or shared-prefix rows under CP, made once per micro-batch for every layer:
    each row's local tokens in runs of one span within one chunk, and for each run the
    whole-row positions of the keys it sees (`ranges`): the span its span continues (its
    group's prompt, models/spans.py) in full, then its own span up to the run's end. The
    run's queries are the last of those keys, so each run is one lower-right causal
    attention (`tail_attention`): no mask. Padding (span 0, at the rows' ends) attends
    within itself like a span: every rank's output then depends on the gathered K and V,
    so every rank's backward takes part in the gather's reduce-scatter (a rank whose
    tokens were all padding would otherwise skip it, and the others would wait for it)."""

    rows: tuple[tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...], ...]

    @staticmethod
    def build(
        spans: torch.Tensor,
        key_spans: torch.Tensor,
        prefixes: torch.Tensor | None,
        size: int,
        rank: int,
    ) -> Pieces:
        """[b, local] `spans` of the view's tokens (0: padding) and `prefixes` (the span
        each one's span continues, 0: none); [b, 1, full] `key_spans` of the whole rows
        (each span, padding too, contiguous in its row)."""
        full = key_spans.size(-1)
        c = full // (2 * size)
        mine = chunks(size, rank, full).tolist()
        rows = []
        for r in range(spans.size(0)):
            ids, counts = torch.unique_consecutive(key_spans[r, 0], return_counts=True)
            ends = counts.cumsum(0).tolist()
            bounds = {
                s: (e - n, e) for s, n, e in zip(ids.tolist(), counts.tolist(), ends, strict=True)
            }
            runs = []
            for chunk in (0, c):  # the rank's two chunks
                at = chunk  # a run's first local token; mine[at]: its position in the row
                ids, counts = torch.unique_consecutive(
                    spans[r, chunk : chunk + c], return_counts=True
                )
                for span, n in zip(ids.tolist(), counts.tolist(), strict=True):
                    ranges = ((bounds[span][0], mine[at] + n),)
                    prefix = int(prefixes[r, at]) if prefixes is not None else 0
                    ranges = ((bounds[prefix],) if prefix > 0 else ()) + ranges
                    runs.append((at, at + n, ranges))
                    at += n
            rows.append(tuple(runs))
        return Pieces(tuple(rows))

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q: [b, heads, local, d]; k, v: the whole rows' in row order."""
        rows = []
        for r, runs in enumerate(self.rows):
            parts = []
            for first, end, ranges in runs:
                kr, vr = (
                    torch.cat([t[r : r + 1, :, a:b] for a, b in ranges], dim=2)
                    if len(ranges) > 1
                    else t[r : r + 1, :, ranges[0][0] : ranges[0][1]]
                    for t in (k, v)
                )
                parts.append(tail_attention(q[r : r + 1, :, first:end], kr, vr, scale))
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    scale: float,
    pieces: Pieces | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's chunks (q, k, v: [b, heads, 2c, d], K/V heads
    fewer under GQA) to the whole rows: K and V gathered over the group (only the KV heads
    travel) and put in row order; each chunk's queries sit at the end of the keys up to
    their own chunk's end (packed or shared-prefix rows: `pieces`). -> [b, heads, 2c, d]"""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    c = q.size(2) // 2
    in_row_order = torch.argsort(_gathered_order(size, 2 * c * size)).to(q.device)
    # K and V in one collective each way (their heads side by side)
    kv = gather(torch.cat([k, v], dim=1), group).index_select(2, in_row_order)
    k, v = kv.split([k.size(1), v.size(1)], dim=1)
    if pieces is not None:
        return pieces.attention(q, k, v, scale)
    parts = []
    for i, block in enumerate((rank, 2 * size - 1 - rank)):
        end = (block + 1) * c  # a chunk sees the keys up to its own end
        mine = q[:, :, i * c : (i + 1) * c]
        parts.append(tail_attention(mine, k[:, :, :end], v[:, :, :end], scale))
    return torch.cat(parts, dim=2)


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


def view(mb: dict, size: int, rank: int, multiple: int) -> dict:
    """This rank's part of a right-padded micro-batch (see the module docstring): rows
    padded to a multiple of 2 x size x `multiple`, `labels` and `positions` added, the
    per-token fields taken at the predicting position, then cut to the rank's chunks."""
    ids = mb["input_ids"] if "input_ids" in mb else mb["attention_mask"]
    b, s = ids.shape[:2]
    step = 2 * size * multiple
    length = max(step, -(-s // step) * step)
    out = {}
    for k, v in mb.items():
        if not (v.dim() >= 2 and tuple(v.shape[:2]) == (b, s)):
            out[k] = v  # per sample
            continue
        v = torch.nn.functional.pad(v, [0, 0] * (v.dim() - 2) + [0, length - s])
        out[k] = v if k in INPUTS else v.roll(-1, dims=1)
    if "input_ids" in out:
        out["labels"] = out["input_ids"].roll(-1, dims=1)
    if "positions" not in out:  # (packed rows bring each token's position in its sample)
        out["positions"] = torch.arange(length, device=ids.device).expand(b, length)
    if "spans" in out:  # packed rows: every key's sample, whole (for `Pieces`)
        out["key_spans"] = out["spans"][:, None, :]
    index = chunks(size, rank, length).to(ids.device)
    return {
        k: v[:, index] if v.dim() >= 2 and v.shape[1] == length and v.shape[0] == b else v
        for k, v in out.items()
    }


def unview(out: torch.Tensor, group: dist.ProcessGroup, length: int) -> torch.Tensor:
    """Per-position outputs [b, local, ...] of every rank -> [b, length, ...] in order,
    each moved onto the token it describes (the next one; 0 on the first)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(out) for _ in range(size)]
    dist.all_gather(parts, out.contiguous(), group=group)
    order = _gathered_order(size, length).to(out.device)
    whole = torch.empty((out.shape[0], length, *out.shape[2:]), dtype=out.dtype, device=out.device)
    whole[:, order] = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros_like(whole[:, :1]), whole[:, :-1]], dim=1)
