"""A batch of variable-length samples without padding waste.

Per-token fields are packed end to end ([total_tokens, ...]) and share one `offsets`
vector; per-sample tensors are [n, ...]; per-sample values of any other kind (strings,
numbers, dicts, a vision-language prompt's images) are objects, pickled when they move.
Every sample carries `uid` (global, unique) and `group` (the prompt it was sampled from);
both survive any selection or redistribution.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

REQUIRED_SAMPLE_FIELDS = ("uid", "group")


@dataclass
class Batch:
    offsets: torch.Tensor  # int64 [n + 1], offsets[0] == 0
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    objects: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, total = len(self), int(self.offsets[-1])
        for name in REQUIRED_SAMPLE_FIELDS:
            assert name in self.samples, f"batch lacks per-sample field '{name}'"
        for name, t in self.tokens.items():
            assert t.shape[0] == total, (name, tuple(t.shape), total)
        for name, t in self.samples.items():
            assert t.shape[0] == n, (name, tuple(t.shape), n)
        for name, values in self.objects.items():
            assert len(values) == n, (name, len(values), n)

    @classmethod
    def from_sequences(
        cls,
        tokens: dict[str, Sequence[torch.Tensor]],
        samples: dict[str, torch.Tensor],
        objects: dict[str, list[Any]] | None = None,
    ) -> Batch:
        """Pack per-sample token tensors (all fields of a sample have equal length, at
        least one sample; offsets live with the tokens)."""
        first = next(iter(tokens.values()))
        assert len(first), "from_sequences needs at least one sample: build an empty Batch"
        device = first[0].device
        lengths = torch.tensor([len(t) for t in first], dtype=torch.int64, device=device)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=device)
        offsets[1:] = lengths.cumsum(0)
        packed = {k: torch.cat(list(v)) for k, v in tokens.items()}
        return cls(offsets, packed, dict(samples), dict(objects or {}))

    @classmethod
    def empty(
        cls, tokens: dict[str, torch.dtype], objects: Sequence[str], device: torch.device
    ) -> Batch:
        """No samples, with the fields (and dtypes) a full batch of this kind has, `uid` and
        `group` (int64) included: a rank with nothing to contribute still takes part in
        every collective."""
        return cls(
            torch.zeros(1, dtype=torch.int64, device=device),
            {k: torch.empty(0, dtype=d, device=device) for k, d in tokens.items()},
            {k: torch.empty(0, dtype=torch.int64, device=device) for k in REQUIRED_SAMPLE_FIELDS},
            {k: [] for k in objects},
        )

    def names(self) -> list[str]:
        return [*self.tokens, *self.samples, *self.objects]

    def only(self, names: Collection[str]) -> Batch:
        """The fields in `names` (and `uid`, `group`), sharing their tensors; the batch
        itself when nothing is left out."""
        keep = {*names, *REQUIRED_SAMPLE_FIELDS}
        if keep.issuperset(self.names()):
            return self
        return Batch(
            self.offsets,
            {k: v for k, v in self.tokens.items() if k in keep},
            {k: v for k, v in self.samples.items() if k in keep},
            {k: v for k, v in self.objects.items() if k in keep},
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def token_owner(self) -> torch.Tensor:
        """For every packed token, the index of its sample (on the offsets' device)."""
        index = torch.arange(len(self), device=self.offsets.device)
        return torch.repeat_interleave(index, self.lengths, output_size=self.num_tokens)

    def token_slice(self, name: str, i: int) -> torch.Tensor:
        return self.tokens[name][self.offsets[i] : self.offsets[i + 1]]

    def token_index(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For samples `idx`: their new offsets, and the packed rows their tokens come from."""
        lengths = self.lengths[idx]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64, device=idx.device)
        offsets[1:] = lengths.cumsum(0)
        # token j of the selection comes from j + (its sample's source start - new start)
        total = int(offsets[-1])
        shift = self.offsets[idx] - offsets[:-1]
        rows = torch.repeat_interleave(shift, lengths, output_size=total)
        return offsets, rows + torch.arange(total, device=idx.device)

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """Samples at `indices`, in that order (vectorised gather, no per-sample loop)."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.offsets.device)
        offsets, token_idx = self.token_index(idx)
        index = idx.tolist()
        return Batch(
            offsets,
            {k: v[token_idx.to(v.device)] for k, v in self.tokens.items()},
            {k: v[idx.to(v.device)] for k, v in self.samples.items()},
            {k: [v[i] for i in index] for k, v in self.objects.items()},
        )

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        assert batches, "concat needs at least one batch"
        if len(batches) == 1:
            return batches[0]
        lengths = torch.cat([b.lengths for b in batches])
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=lengths.device)
        offsets[1:] = lengths.cumsum(0)
        first = batches[0]
        return Batch(
            offsets,
            {k: torch.cat([b.tokens[k] for b in batches]) for k in first.tokens},
            {k: torch.cat([b.samples[k] for b in batches]) for k in first.samples},
            {k: [x for b in batches for x in b.objects[k]] for k in first.objects},
        )
