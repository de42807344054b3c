"""Context parallelism's mask-free attention (models/context.py) against torch's attention
with the dense lower-right causal mask: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow_mc.models.context import _lower_right, tail_attention


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
