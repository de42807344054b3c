"""Context parallelism's data (data/chunks.py): what each CP rank holds of a batch."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow_mc.data.batch import Batch
from distflow_mc.data.chunks import cut
from tests.chunks_ref import held


@settings(max_examples=40, deadline=None)
@given(
    size=st.sampled_from([2, 3, 4]),
    shape=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 30)), min_size=0, max_size=5),
    prompts=st.booleans(),
)
def test_each_rank_holds_its_chunks_of_every_sample(size, shape, prompts):
    """Over the ranks every token of every sample is held once, at its true position; the
    model's input on its own token, every other field and the labels on the token before
    theirs; padding zeros; every rank holds as many tokens of each sample, about 1/size
    of it; per-sample fields whole."""
    lengths = [max(n, 1) for n, _ in shape]
    first = [min(p, n - 1) if prompts else 0 for (_, p), n in zip(shape, lengths, strict=True)]
    g = torch.Generator().manual_seed(len(shape))
    seqs = [torch.randint(1, 100, (n,), generator=g) for n in lengths]
    values = [torch.rand(n, 2, generator=g) for n in lengths]
    samples = {"uid": torch.arange(len(lengths)), "group": torch.zeros(len(lengths)).long()}
    if prompts:
        samples["prompt_length"] = torch.tensor(first, dtype=torch.int64) + 1
    if not lengths:
        batch = Batch.empty({"input_ids": torch.int64, "values": torch.float32}, [], "cpu")
        batch.samples |= {k: v for k, v in samples.items() if k not in batch.samples}
    else:
        batch = Batch.from_sequences({"input_ids": seqs, "values": values}, samples)
    seen: dict[tuple[int, int], int] = {}
    local = None
    for rank in range(size):
        mine = cut(batch, size, rank)
        assert set(mine.tokens) == {"input_ids", "values", "labels", "positions"}
        assert all(torch.equal(mine.samples[k], v) for k, v in batch.samples.items())
        if local is None:
            local = mine.lengths
        assert torch.equal(mine.lengths, local)  # the ranks' rows line up
        for i, n in enumerate(lengths):
            a = first[i]
            ids, labels = mine.token_slice("input_ids", i), mine.token_slice("labels", i)
            vals, pos = mine.token_slice("values", i), mine.token_slice("positions", i)
            pad_a = -(-a // (2 * size)) * 2 * size
            pad_b = -(-(n - a) // (2 * size)) * 2 * size
            assert len(ids) == (pad_a + pad_b) // size
            assert pos.tolist() == [p for p, _ in held(n, a, size, rank)]
            for k, p in enumerate(pos.tolist()):
                in_a = k < pad_a // size
                real = p < a if in_a else p < n
                if not real:
                    assert ids[k] == 0 and labels[k] == 0 and not vals[k].any()
                    continue
                seen[(i, p)] = seen.get((i, p), 0) + 1
                assert ids[k] == seqs[i][p]
                if p + 1 < n:
                    assert labels[k] == seqs[i][p + 1]
                    assert torch.equal(vals[k], values[i][p + 1])
                else:
                    assert labels[k] == 0 and not vals[k].any()
    assert seen == {(i, p): 1 for i, n in enumerate(lengths) for p in range(n)}
