"""Context parallelism's data (parallel.cp = C): each rank of a CP group holds its chunks of
every sample, from the move into the train layout to the loss.

A sample is two segments: its prompt but the prompt's last token (`split`: a group's
samples can then share it, trainer.shared_prefix), and the rest. Each segment is padded
to a multiple of 2C and cut into 2C chunks; CP rank i holds chunks i and 2C - 1 - i of
each (megatron's balance for causal attention), prompt part first:

    prompt part [ a0 | a1 | a2 | a3 ]   rest [ b0 | b1 | b2 | b3 ]     C = 2
    rank 0: a0 a3 b0 b3                 rank 1: a1 a2 b1 b2

A rank's tokens keep their true positions (`positions`, padding counting on past its
segment's end). The model's inputs sit on their own token (`INPUTS`); every other
per-token field sits on the token before its own (the predicting position: a token's loss
needs the output of the position before it, which may be on another rank), `labels` (the
next token) with them, so that a loss needs no neighbour; padding carries zeros.
"""

from __future__ import annotations

import torch

from distflow_mc.data.batch import Batch

INPUTS = ("input_ids",)  # what stays on its own token


def _chunk(tokens, size: int):
    """The chunk size of segments of `tokens` (an int, a tensor or a numpy array) cut for
    a group of `size`: padded to a multiple of 2 x size, then cut in 2 x size."""
    return -(-tokens // (2 * size))


def split(batch: Batch) -> torch.Tensor:
    """Per sample, its first segment's tokens: the prompt but its last token (whose output
    predicts the first response token), 0 when the batch carries no prompt lengths. (The
    same for a cut batch: its samples' prompt lengths are whole.)"""
    if "prompt_length" not in batch.samples:
        return torch.zeros_like(batch.lengths)
    return (batch.samples["prompt_length"].to(batch.offsets.device) - 1).clamp(min=0)


def local_heads(batch: Batch, size: int) -> list[int]:
    """Per sample of a cut batch, how many of its tokens are its first segment's."""
    return [2 * _chunk(a, size) for a in split(batch).tolist()]


def held_tokens(lengths, firsts, size: int):
    """How many tokens a rank holds of samples of `lengths` whose first segments have
    `firsts` (tensors or numpy arrays): the same on every rank of the group."""
    return 2 * (_chunk(firsts, size) + _chunk(lengths - firsts, size))


def held(
    lengths: torch.Tensor, firsts: torch.Tensor, size: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, how many tokens rank `rank` holds of it; per token it holds, its true
    position and whether it is real (not padding)."""
    c_a, c_b = _chunk(firsts, size), _chunk(lengths - firsts, size)  # per segment
    local = 2 * (c_a + c_b)
    owner = torch.repeat_interleave(torch.arange(len(local), device=local.device), local)
    k = torch.arange(len(owner), device=local.device) - (local.cumsum(0) - local)[owner]
    head = 2 * c_a[owner]
    first = k < head  # in the prompt part
    c = torch.where(first, c_a[owner], c_b[owner])
    k = torch.where(first, k, k - head)
    order = torch.where(k < c, rank * c + k, (2 * size - 1 - rank) * c + k - c)
    a = firsts[owner]
    positions = torch.where(first, order, a + order)
    real = torch.where(first, order < a, order < lengths[owner] - a)
    return local, positions, real


def cut(batch: Batch, size: int, rank: int, firsts: torch.Tensor | None = None) -> Batch:
    """The tokens rank `rank` of a CP group of `size` holds of `batch` (see the module
    docstring), with their `positions` and `labels`. Per-sample fields stay whole.
    `firsts`: the samples' first segments, when `batch` lacks their prompt lengths (a
    move's later round)."""
    device = batch.offsets.device
    lengths = batch.lengths
    firsts = split(batch) if firsts is None else firsts
    local, positions, real = held(lengths, firsts, size, rank)
    owner = torch.repeat_interleave(torch.arange(len(batch), device=device), local)
    nxt = real & (positions + 1 < lengths[owner])  # the next token is the sample's
    at = torch.where(real, batch.offsets[owner] + positions, 0)
    after = torch.where(nxt, at + 1, 0)
    tokens = {}
    for name, values in [*batch.tokens.items(), *[("labels", batch.tokens.get("input_ids"))]]:
        if values is None:  # (no input_ids: no labels)
            continue
        index, keep = (at, real) if name in INPUTS else (after, nxt)
        picked = values.index_select(0, index.to(values.device))
        drop = ~keep.to(values.device).view(-1, *[1] * (values.dim() - 1))
        tokens[name] = picked.masked_fill_(drop, 0)  # padding, and past a sample's end
    tokens["positions"] = positions
    offsets = torch.zeros(len(batch) + 1, dtype=torch.int64, device=device)
    offsets[1:] = local.cumsum(0)
    return Batch(offsets, tokens, dict(batch.samples), dict(batch.objects))
