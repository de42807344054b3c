"""Context parallelism against torch's attention: the mask-free tail attention against the
dense lower-right causal mask, and every CP rank's chunks of a batch (data/chunks.py,
models/context.py's Pieces) against each whole sample's causal attention: outputs and
gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow_mc.data.batch import Batch
from distflow_mc.data.chunks import cut, local_heads, split
from distflow_mc.data.microbatch import Item, packed_microbatch
from distflow_mc.models.context import Pieces, _lower_right, tail_attention
from tests.chunks_ref import held


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
        torch.testing.assert_close(got, want, atol=5e-6, rtol=1e-5)


def test_tail_attention_in_bf16_is_the_dense_one_rounded():
    inputs = _inputs(0, 2, 2, 2, 16, 48, 8, torch.bfloat16)
    exact = _dense(*(t.detach().double() for t in inputs), 0.3)
    got, dense = tail_attention(*inputs, 0.3), _dense(*inputs, 0.3)
    assert got.dtype == torch.bfloat16
    # as close to the float64 result as torch's own bf16 kernel is
    assert (got.double() - exact).abs().max() <= 2 * (dense.double() - exact).abs().max()


@st.composite
def cp_batches(draw):
    """A batch of groups of samples (a group's samples share their prompt), how many ranks
    hold chunks of it, and its micro-batch layout: rows of samples or of a group's shared
    prompt part and its samples (trainer.shared_prefix), one item per row or all in one
    (trainer.sequence_packing)."""
    size = draw(st.sampled_from([2, 3]))
    seqs, prompts, groups = [], [], []
    for g in range(draw(st.integers(1, 3))):
        prompt = draw(st.integers(1, 9))
        ids = torch.randint(0, 50, (prompt,), generator=torch.Generator().manual_seed(g))
        for _ in range(draw(st.integers(1, 3))):
            rest = draw(st.integers(0, 9))
            seqs.append(torch.cat([ids, torch.randint(0, 50, (rest,))]))
            prompts.append(prompt)
            groups.append(g)
    n = len(seqs)
    uid = torch.arange(n)
    batch = Batch.from_sequences(
        {"input_ids": seqs, "response_mask": [torch.ones(len(x)) for x in seqs]},
        {"uid": uid, "group": torch.tensor(groups), "prompt_length": torch.tensor(prompts)},
    )
    share, packed = draw(st.booleans()), draw(st.booleans())
    return size, batch, share, packed


def _items(batch: Batch, size: int, share: bool) -> list[Item]:
    heads = local_heads(batch, size)
    if not share:
        return [Item((i,), heads[i]) for i in range(len(batch))]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(batch.samples["group"].tolist()):
        members.setdefault(g, []).append(i)
    return [Item(tuple(m), heads[m[0]]) for m in members.values()]


def _qkv(batch: Batch, seed: int) -> tuple[list, list]:
    """Each sample's q, k and v ([heads, tokens, d]; 4 query, 2 K/V heads): its prompt but
    the last token from its group's leaves (alike, as a shared prompt's are), the rest its
    own; and the leaves."""
    g = torch.Generator().manual_seed(seed)
    leaves, prompts, whole = [], {}, []
    for i, a in enumerate(split(batch)):
        n, group = int(batch.lengths[i]), int(batch.samples["group"][i])
        if group not in prompts:
            prompts[group] = [torch.randn(h, a, 8, generator=g).requires_grad_() for h in (4, 2, 2)]
            leaves += prompts[group]
        own = [torch.randn(h, n - a, 8, generator=g).requires_grad_() for h in (4, 2, 2)]
        leaves += own
        whole.append([torch.cat([p, o], dim=1) for p, o in zip(prompts[group], own, strict=True)])
    return whole, leaves


@settings(max_examples=30, deadline=None)
@given(layout=cp_batches(), seed=st.integers(0, 2**16))
def test_cp_chunks_attend_as_whole_samples(layout, seed):
    """Every CP rank's chunks of a batch (data/chunks.py's cut, data/microbatch.py's rows,
    context.Pieces over the ranks' K and V side by side, as the gather puts them) against
    torch's causal attention of each whole sample on its own: every rank's real tokens'
    outputs, and the gradients of the samples' q, k and v summed over the ranks. Padding's
    q, k and v are noise: no real token may see it."""
    size, batch, share, packed = layout
    whole, leaves = _qkv(batch, seed)
    noise = torch.Generator().manual_seed(seed + 1)
    items = _items(cut(batch, size, 0), size, share)  # (as the trainer: from its chunks)
    rows = [items] if packed else [[item] for item in items]
    lengths, firsts = batch.lengths.tolist(), split(batch).tolist()
    ranks = []
    for rank in range(size):
        mine = cut(batch, size, rank)
        mb, places = packed_microbatch(mine, rows, 0, spans=True)
        b, length = mb["spans"].shape
        truth = [
            torch.tensor([r for _, r in held(n, a, size, rank)])
            for n, a in zip(lengths, firsts, strict=True)
        ]
        real = torch.zeros(b * length, dtype=torch.bool)
        sample = torch.zeros(b * length, dtype=torch.int64)
        real[places], sample[places] = torch.cat(truth), mine.token_owner()
        real, sample = real.view(b, length), sample.view(b, length)
        position = mb["positions"]
        qkv = []
        for t, h in enumerate((4, 2, 2)):
            junk = torch.randn(b, h, length, 8, generator=noise)
            cols = [
                [
                    whole[sample[r, c]][t][:, position[r, c]] if real[r, c] else junk[r, :, c]
                    for c in range(length)
                ]
                for r in range(b)
            ]
            qkv.append(torch.stack([torch.stack(row, dim=1) for row in cols]))
        pieces = Pieces.build(mb["spans"], mb["prefixes"], position, size, rank)
        ranks.append((qkv, pieces, real, sample, position))
    kv = torch.cat([torch.cat([qkv[1], qkv[2]], dim=1) for qkv, *_ in ranks], dim=2)
    total, reference = 0, 0
    dense = [_dense(q[None], k[None], v[None], 0.3)[0] for q, k, v in whole]
    for qkv, pieces, real, sample, position in ranks:
        out = pieces.attention(qkv[0], kv, 0.3)
        for r, c in real.nonzero().tolist():
            i, pos = int(sample[r, c]), int(position[r, c])
            torch.testing.assert_close(out[r, :, c], dense[i][:, pos], atol=2e-6, rtol=1e-5)
            total = total + out[r, :, c].sum()
            reference = reference + dense[i][:, pos].sum()
    got = torch.autograd.grad(total, leaves, allow_unused=True)
    want = torch.autograd.grad(reference, leaves, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-5)


def test_a_rank_holding_only_padding_still_reads_the_gathered_keys():
    """An all-padding micro-batch (an interleaved pipeline's filler) and a one-token sample
    (rank 1 of 2 holds only its segment's padding): each rank's output depends on the
    gathered K and V, so its backward joins the gather's reduce-scatter."""
    one = Batch.from_sequences(
        {"input_ids": [torch.tensor([5])]}, {"uid": torch.arange(1), "group": torch.arange(1)}
    )
    mb, _ = packed_microbatch(cut(one, 2, 1), [[Item((0,))]], 0, spans=True)
    filler = torch.zeros(2, 4, dtype=torch.int64)
    for spans, prefixes, positions in (
        (filler, filler, filler),
        (mb["spans"], mb["prefixes"], mb["positions"]),
    ):
        b, length = spans.shape
        q = torch.randn(b, 4, length, 8)
        kv = torch.randn(b, 4, 2 * length, 8, requires_grad=True)
        out = Pieces.build(spans, prefixes, positions, 2, 1).attention(q, kv, 0.3)
        assert out.shape == q.shape and torch.isfinite(out).all()
        assert torch.autograd.grad(out.sum(), kv)[0].abs().sum() > 0
