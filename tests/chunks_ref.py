"""A reference for data/chunks.py's layout, written plainly, sample by sample: which true
positions of a sample a CP rank holds, in its order, and which of them are real."""

from __future__ import annotations


def held(length: int, first: int, size: int, rank: int) -> list[tuple[int, bool]]:
    """The sample's two segments (its first `first` tokens, the rest), each padded to a
    multiple of 2 x size and cut into 2 x size chunks: the rank's chunks `rank` and
    `2 x size - 1 - rank` of each, (position, real) per token."""
    out = []
    for start, tokens in ((0, first), (first, length - first)):
        c = -(-tokens // (2 * size))
        for block in (rank, 2 * size - 1 - rank):
            out += [(start + block * c + i, block * c + i < tokens) for i in range(c)]
    return out
