"""The rope that SDPAttention applies while laying Q/K out equals megatron's own rope."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from distflow_mc.models.gpt import rope_batch_major


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_batch_major_is_megatrons_rope_laid_out(dtype):
    s, b, heads, d = 7, 3, 4, 16
    g = torch.Generator().manual_seed(0)
    t = torch.randn(s, b, heads, d, generator=g).to(dtype).requires_grad_()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # megatron's RotaryEmbedding
    ours = rope_batch_major(t, emb)
    theirs = _apply_rotary_pos_emb_bshd(t, emb).permute(1, 2, 0, 3)
    assert ours.shape == (b, heads, s, d)
    assert ours.transpose(1, 2).is_contiguous()  # [b, s, heads, d] memory
    assert torch.equal(ours, theirs)
    grad = torch.randn(ours.shape, generator=g).to(dtype)
    (ours_grad,) = torch.autograd.grad(ours, t, grad)
    (theirs_grad,) = torch.autograd.grad(theirs, t, grad)
    torch.testing.assert_close(ours_grad, theirs_grad)


def test_no_freqs_only_lays_out():
    t = torch.randn(5, 2, 3, 8)
    out = rope_batch_major(t, None)
    assert torch.equal(out, t.permute(1, 2, 0, 3)) and out.transpose(1, 2).is_contiguous()
