"""Context parallelism (parallel.cp = C) on the local layer spec: each rank of a CP group
holds two of the 2C chunks of every row (chunks i and 2C - 1 - i, megatron's balance for
causal attention), with its tokens' true positions; attention gathers K and V over the
group and masks by position.

    [ c0 | c1 | c2 | c3 ]  C = 2: rank 0 holds c0 and c3, rank 1 holds c1 and c2

A micro-batch's view for this rank (`view`): every [b, s] tensor cut to its chunks, the
labels (the next token) and the fields the losses read taken at the predicting position
before the cut (a token's loss needs the output of the position before it, which may sit on
another rank), so a loss needs no neighbour. Forward-only outputs come back whole
(`unview`): gathered over the group, put back in order, moved onto the token they describe.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distflow_mc.models.spans import additive

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


def position_mask(
    group: dist.ProcessGroup,
    length: int,
    device: torch.device,
    dtype: torch.dtype,
    spans: torch.Tensor | None = None,
    key_spans: torch.Tensor | None = None,
    prefixes: torch.Tensor | None = None,
) -> torch.Tensor:
    """What every layer's attention needs of a micro-batch under CP: [1, 1, local, full]
    in SDPA's additive form (0 / -inf), a key allowed where its position in the row <= the
    query's; with packed or shared-prefix rows ([b, local] `spans` of the view's tokens and
    `prefixes`, the span each one's span continues, 0: none; [b, 1, length] `key_spans` of
    the whole rows') [b, 1, local, full], and only within the query's own span and the
    span it continues (its group's prompt: models/spans.py). Made once for every layer,
    and a tensor, so that activation recomputation (trainer.recompute) saves it with a
    layer's input."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = chunks(size, rank, length).to(device)
    order = _gathered_order(size, length).to(device)
    allowed = (order[None, :] <= mine[:, None])[None, None]
    if key_spans is not None:  # the keys in the order the gather puts them
        keys = key_spans[:, :, None, order]
        within = spans[:, None, :, None] == keys
        if prefixes is not None:
            continued = prefixes[:, None, :, None]
            within |= (continued > 0) & (continued == keys)
        allowed = allowed & within
    return additive(allowed, dtype)


def gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, heads, local, d] from every rank of the group -> [b, heads, full, d], in rank
    order; the backward sums each part's gradient onto its rank."""
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
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # (gloo has no reduce-scatter)
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=2)[rank].contiguous(), None


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
    if "spans" in out:  # packed rows: every key's sample, whole (for `position_mask`)
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
