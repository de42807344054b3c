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


def chunks(size: int, rank: int, length: int) -> torch.Tensor:
    """The orders rank `rank` of `size` holds of a segment of `length` (a multiple of
    2 x size) tokens."""
    c = length // (2 * size)
    last = 2 * size - 1 - rank
    return torch.cat(
        [torch.arange(rank * c, (rank + 1) * c), torch.arange(last * c, (last + 1) * c)]
    )


def padded(tokens: int, size: int) -> int:
    """A segment's length padded to a multiple of 2 x size."""
    return -(-tokens // (2 * size)) * 2 * size


def split(batch: Batch) -> list[int]:
    """Per sample, its first segment's tokens: the prompt but its last token (whose output
    predicts the first response token), 0 when the batch carries no prompt lengths. (The
    same for a cut batch: its samples' prompt lengths are whole.)"""
    if "prompt_length" not in batch.samples:
        return [0] * len(batch)
    return (batch.samples["prompt_length"].cpu() - 1).clamp(min=0).tolist()


def layout(length: int, first: int, size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample of `length` tokens whose first segment has `first`: the true positions of
    the tokens rank `rank` holds, in its order, and which of them are real (not padding)."""
    a = chunks(size, rank, padded(first, size))
    b = chunks(size, rank, padded(length - first, size))
    return torch.cat([a, first + b]), torch.cat([a < first, b < length - first])


def local_heads(batch: Batch, size: int) -> list[int]:
    """Per sample of a cut batch, how many of its tokens are its first segment's."""
    return [padded(a, size) // size for a in split(batch)]


def cut(batch: Batch, size: int, rank: int) -> Batch:
    """The tokens rank `rank` of a CP group of `size` holds of `batch` (see the module
    docstring), with their `positions` and `labels`. Per-sample fields stay whole."""
    device = batch.offsets.device
    lengths = batch.lengths.tolist()
    where = [layout(n, a, size, rank) for n, a in zip(lengths, split(batch), strict=True)]
    local = torch.tensor([len(p) for p, _ in where], dtype=torch.int64)
    positions = torch.cat([p for p, _ in where]) if where else torch.zeros(0, dtype=torch.int64)
    real = torch.cat([r for _, r in where]) if where else torch.zeros(0, dtype=torch.bool)
    n = torch.repeat_interleave(torch.tensor(lengths, dtype=torch.int64), local)
    start = torch.repeat_interleave(batch.offsets[:-1].cpu(), local)
    nxt = real & (positions + 1 < n)  # the next token is the sample's
    at = torch.where(real, start + positions, 0).to(device)
    after = torch.where(nxt, start + positions + 1, 0).to(device)
    real, nxt = real.to(device), nxt.to(device)
    tokens = {}
    for name, values in batch.tokens.items():
        index, keep = (at, real) if name in INPUTS else (after, nxt)
        picked = values[index.to(values.device)]
        mask = keep.to(values.device).view(-1, *[1] * (values.dim() - 1))
        tokens[name] = torch.where(mask, picked, torch.zeros_like(picked))
    if "input_ids" in batch.tokens:
        ids = batch.tokens["input_ids"]
        tokens["labels"] = torch.where(nxt.to(ids.device), ids[after.to(ids.device)], 0)
    tokens["positions"] = positions.to(device)
    offsets = torch.zeros(len(batch) + 1, dtype=torch.int64, device=device)
    offsets[1:] = local.to(device).cumsum(0)
    return Batch(offsets, tokens, dict(batch.samples), dict(batch.objects))
