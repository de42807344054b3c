"""Attention over packed rows without a dense [row, row] mask.

A packed row holds spans end to end: samples (sequence packing), or a group's shared prompt
followed by each sample's own part (trainer.shared_prefix). A token attends to the tokens
before it in its own span and, when its span has one, to every token of its prefix span.
`Spans` gathers each span's tokens into a padded [spans, length] batch (two batches: spans
with a prefix and spans without, so a long prompt never pads the short answers) and runs
torch's fused attention on each, its keys the prefix's tokens then the span's own: the work
is each span's length times what it attends to, not the row's length squared.

Built once per micro-batch (`once`) from the per-token ids the micro-batch carries, which
every layer gets as its attention mask: a tensor, which megatron's full recompute can save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")
_built: list[tuple[torch.Tensor, object]] = []  # the last plan and what was made of it


def once(plan: torch.Tensor, build: Callable[[], T]) -> T:
    """What `build` makes of a micro-batch's `plan` (its per-token span ids, stacked), made
    once: every layer of a forward, and a full recompute's rerun in the backward, passes
    the same plan."""
    if not (_built and _built[0][0].shape == plan.shape and torch.equal(_built[0][0], plan)):
        _built[:] = [(plan, build())]
    return _built[0][1]


def forget() -> None:
    """Drop the last plan's build (at the end of a schedule: its masks are no longer read)."""
    _built.clear()


def additive(allowed: torch.Tensor, dtype: torch.dtype, cache: dict | None = None) -> torch.Tensor:
    """`allowed` as SDPA's additive mask (0 / -inf) in `dtype`, made once (kept in `cache`
    when given) for every layer: given the boolean, torch converts it in each call and keeps
    each layer's copy for the backward (4 layers, a [4K, 8K] mask: 531 MB against 26)."""
    cache = {} if cache is None else cache
    if dtype not in cache:
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        cache[dtype] = zeros.masked_fill_(~allowed, float("-inf"))
    return cache[dtype]


@dataclass(frozen=True)
class _Call:
    own: torch.Tensor  # [n, L] flat token index (rows x length) of each span's tokens
    valid: torch.Tensor  # [n, L]
    targets: torch.Tensor  # own[valid]: where the real tokens' outputs go
    keys: torch.Tensor  # [n, P + L] its prefix's tokens, then its own
    allowed: torch.Tensor  # [n, 1, L, P + L]
    masks: dict = field(default_factory=dict, compare=False)  # dtype -> additive form


@dataclass(frozen=True)
class Spans:
    calls: tuple[_Call, ...]

    @staticmethod
    def build(spans: torch.Tensor, prefixes: torch.Tensor) -> Spans:
        """`spans` [b, s]: each token's span id (1, 2, ... in row-major order of first
        appearance, each span contiguous within a row; 0: padding); `prefixes` [b, s]: the
        id of the span each token's span continues (0: none)."""
        flat = spans.flatten()
        where = (flat > 0).nonzero().squeeze(1)
        if len(where) == 0:
            return Spans(())
        ids = flat[where] - 1
        n = int(ids.max()) + 1
        lengths = torch.bincount(ids, minlength=n)
        starts = torch.zeros_like(lengths)
        starts[1:] = lengths.cumsum(0)[:-1]
        rank = torch.arange(len(ids), device=ids.device) - starts[ids]  # position in its span
        width = int(lengths.max())
        own = torch.zeros(n, width, dtype=torch.int64, device=ids.device)
        own[ids, rank] = where
        valid = torch.zeros(n, width, dtype=torch.bool, device=ids.device)
        valid[ids, rank] = True
        prefix = prefixes.flatten()[where[starts]] - 1  # at each span's first token; -1: none
        calls = []
        for has in (False, True):
            pick = (((prefix >= 0) == has) & (lengths > 0)).nonzero().squeeze(1)
            if len(pick) == 0:
                continue
            width = int(lengths[pick].max())
            o, v = own[pick, :width], valid[pick, :width]
            causal = torch.ones(width, width, dtype=torch.bool, device=o.device).tril()
            mine = causal[None] & v[:, None, :]  # padding queries see the valid keys
            if has:
                p = prefix[pick]
                pw = int(lengths[p].max())
                keys = torch.cat([own[p, :pw], o], dim=1)
                seen = valid[p, :pw][:, None, :].expand(-1, width, -1)
                allowed = torch.cat([seen, mine], dim=2)
            else:
                keys, allowed = o, mine
            calls.append(_Call(o, v, o[v], keys, allowed[:, None]))
        return Spans(tuple(calls))

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """softmax(Q K^T * scale) V over [b, heads, s, d] inputs (K and V may have fewer
        heads), each token attending as the spans say; [b, heads, s, d], 0 on padding."""
        b, hq, s, d = q.shape
        qf, kf, vf = (t.transpose(1, 2).reshape(b * s, t.size(1), d) for t in (q, k, v))
        out = q.new_zeros(b * s, hq, d)
        for c in self.calls:
            part = F.scaled_dot_product_attention(
                qf[c.own].transpose(1, 2),
                kf[c.keys].transpose(1, 2),
                vf[c.keys].transpose(1, 2),
                additive(c.allowed, q.dtype, c.masks),
                scale=scale,
                enable_gqa=hq != k.size(1),
            )
            out = out.index_put((c.targets,), part.transpose(1, 2)[c.valid])
        return out.view(b, s, hq, d).transpose(1, 2)
