"""Span attention (models/spans.py) against torch's attention with the dense [row, row]
mask it stands for: outputs and gradients, for packed samples and shared prefixes, with
grouped K/V heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow_mc.data.batch import Batch
from distflow_mc.data.microbatch import item_size, pack_rows, packed_microbatch, shared_items
from distflow_mc.models.spans import Spans


def dense_allowed(spans: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s]: causal, within a token's span or its span's prefix; padding sees
    itself only (its output is not used)."""
    s = spans.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = spans[:, :, None] == spans[:, None, :]
    prefix = (prefixes[:, :, None] == spans[:, None, :]) & (prefixes[:, :, None] > 0)
    pad = (spans == 0)[:, :, None] & torch.eye(s, dtype=torch.bool)[None]
    return (((same | prefix) & causal & (spans > 0)[:, :, None]) | pad)[:, None]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 7), st.lists(st.integers(1, 6), min_size=1, max_size=4)),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
    st.booleans(),
)
def test_span_attention_is_the_masked_attention(groups, share, packing):
    g = torch.Generator().manual_seed(sum(len(r) for _, r in groups))
    ids, group, prompts = [], [], []
    for k, (p, responses) in enumerate(groups):
        for r in responses:
            ids.append(torch.zeros(p + r, dtype=torch.int64))
            group.append(k)
            prompts.append(p)
    samples = {"uid": torch.arange(len(ids)), "group": torch.tensor(group)}
    batch = Batch.from_sequences({"input_ids": ids}, samples, {})
    lengths = batch.lengths.tolist()
    items = shared_items(lengths, group, prompts if share else [1] * len(ids), 10**6)
    sizes = [item_size(it, lengths) for it in items]
    rows = pack_rows(sizes) if packing else [[k] for k in range(len(items))]
    mb, _ = packed_microbatch(batch, [[items[k] for k in row] for row in rows])
    if "spans" not in mb:  # one sample per row: plain causal attention, no spans
        return
    spans, prefixes = mb["spans"], mb["prefixes"]
    b, s = spans.shape
    q = torch.randn(b, 4, s, 8, generator=g, requires_grad=True)
    k = torch.randn(b, 2, s, 8, generator=g, requires_grad=True)
    v = torch.randn(b, 2, s, 8, generator=g, requires_grad=True)
    got = Spans.build(spans, prefixes).attention(q, k, v, 0.3)
    want = F.scaled_dot_product_attention(
        q, k, v, dense_allowed(spans, prefixes), scale=0.3, enable_gqa=True
    )
    real = (spans > 0)[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=1e-5, atol=1e-6)
    weights = torch.randn(want.shape, generator=g) * real
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    wants = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, w in zip(grads, wants, strict=True):  # (float32 sums in another order: ~1e-6)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=5e-6)
