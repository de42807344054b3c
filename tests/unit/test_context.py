"""Context parallelism's mask-free attention (models/context.py) against torch's attention
with the dense lower-right causal mask: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow_mc.models.context import Pieces, _lower_right, chunks, tail_attention


def _dense(q, k, v, scale):
    n, m = q.size(2), k.size(2)
    allowed = torch.ones(n, m, dtype=torch.bool).tril(m - n)  # lower-right causal
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


def _inputs(seed, rows, kv_heads, groups, queries, before, dim, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, kv_heads * groups, queries, dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, before + queries, dim, generator=g) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _grads(fn, inputs, grad):
    out = fn(*inputs, 0.3)
    return (out, *torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("fn", [tail_attention, _lower_right], ids=["cpu", "gpu_path"])
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 3]),  # query heads per K/V head (GQA)
    queries=st.integers(1, 9),
    before=st.integers(0, 20),  # keys before the queries' own block (0: square causal)
    dim=st.sampled_from([4, 8]),
)
def test_tail_attention_is_lower_right_causal(
    fn, seed, rows, kv_heads, groups, queries, before, dim
):
    inputs = _inputs(seed, rows, kv_heads, groups, queries, before, dim)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 1))
    for got, want in zip(_grads(fn, inputs, grad), _grads(_dense, inputs, grad), strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_tail_attention_in_bf16_is_the_dense_one_rounded():
    inputs = _inputs(0, 2, 2, 2, 16, 48, 8, torch.bfloat16)
    exact = _dense(*(t.detach().double() for t in inputs), 0.3)
    got, dense = tail_attention(*inputs, 0.3), _dense(*inputs, 0.3)
    assert got.dtype == torch.bfloat16
    # as close to the float64 result as torch's own bf16 kernel is
    assert (got.double() - exact).abs().max() <= 2 * (dense.double() - exact).abs().max()


@st.composite
def span_rows(draw):
    """Rows of spans end to end (0: padding at the end): samples, or a group's prompt then
    its samples, each continuing the prompt (models/spans.py's layouts), and how many ranks
    cut them (the row a multiple of 2 x CP)."""
    size = draw(st.sampled_from([2, 3]))
    b = draw(st.integers(1, 2))
    rows, prefixes, next_id = [], [], 1
    for _ in range(b):
        row, pre = [], []
        for _ in range(draw(st.integers(1, 3))):
            prompt, n = next_id, draw(st.integers(1, 7))
            row += [prompt] * n
            pre += [0] * n
            next_id += 1
            for _ in range(draw(st.integers(0, 3))):  # samples continuing the prompt
                n = draw(st.integers(1, 6))
                row += [next_id] * n
                pre += [prompt] * n
                next_id += 1
        rows.append((row, pre))
    step = 2 * size
    full = max(-(-len(r) // step) * step for r, _ in rows) + step * draw(st.integers(0, 1))
    spans = torch.zeros(b, full, dtype=torch.int64)
    prefixes = torch.zeros(b, full, dtype=torch.int64)
    for i, (row, pre) in enumerate(rows):
        spans[i, : len(row)], prefixes[i, : len(pre)] = torch.tensor(row), torch.tensor(pre)
    return size, spans, prefixes


@settings(max_examples=30, deadline=None)
@given(layout=span_rows(), seed=st.integers(0, 2**16))
def test_cp_pieces_are_the_span_masked_attention(layout, seed):
    """Every CP rank's runs of span tokens (context.Pieces), against torch's attention of
    the whole rows with the dense span mask (a token sees its span's earlier tokens and the
    whole span its span continues): every rank's real tokens' outputs, and the gradients
    of q, k and v summed over the ranks."""
    size, spans, prefixes = layout
    b, full = spans.shape
    q, k, v = _inputs(seed, b, 2, 2, full, 0, 8)
    pos = torch.arange(full)
    keys = spans[:, None, None, :]
    allowed = (pos[None, :] <= pos[:, None])[None, None] & (
        (keys == spans[:, None, :, None])
        | ((prefixes[:, None, :, None] > 0) & (keys == prefixes[:, None, :, None]))
    )
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    real = spans > 0
    grad = torch.randn(dense.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad = grad * real[:, None, :, None]
    want = torch.autograd.grad((dense * grad).sum(), (q, k, v))
    total = 0
    for rank in range(size):
        mine = chunks(size, rank, full)
        pieces = Pieces.build(spans[:, mine], spans[:, None, :], prefixes[:, mine], size, rank)
        out = pieces.attention(q[:, :, mine], k, v, 0.3)
        mask = real[:, mine][:, None, :, None]
        torch.testing.assert_close(out * mask, dense[:, :, mine] * mask, atol=2e-6, rtol=1e-5)
        total = total + (out * grad[:, :, mine]).sum()
    for got, expected in zip(torch.autograd.grad(total, (q, k, v)), want, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_a_rank_holding_only_padding_still_reads_the_gathered_keys():
    """Rows whose real tokens all sit in rank 0's first chunk: rank 1 holds padding only,
    yet its output depends on K and V (its backward must join the gather's all-reduce)."""
    spans = torch.zeros(2, 16, dtype=torch.int64)
    spans[0, :3], spans[1, :2] = 1, 2
    q, k, v = _inputs(0, 2, 2, 2, 16, 0, 8)
    mine = chunks(2, 1, 16)
    assert (spans[:, mine] == 0).all()
    pieces = Pieces.build(spans[:, mine], spans[:, None, :], None, 2, 1)
    out = pieces.attention(q[:, :, mine], k, v, 0.3)
    grads = torch.autograd.grad(out.sum(), (k, v))  # (raises when unused)
    assert all(g.abs().sum() > 0 for g in grads) and torch.isfinite(out).all()
