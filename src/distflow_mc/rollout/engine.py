"""The small protocol every rollout engine implements."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

Bucket = list[tuple[str, torch.Tensor]]  # HF parameter names and full tensors


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Images:
    """A prompt's images as its model's processor makes them: every patch of every image,
    in the order of their tokens ([patches, channels x frames x patch pixels]), and each
    image's patch grid ([images, 3]: frames, rows, columns)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor


@dataclass
class Generation:
    """Per sample (prompt i's samples at [i*n, (i+1)*n)): response tokens (a stop token
    included), their log-probs under softmax(logits / T) (T = 1 when greedy), and why
    generation ended ("stop" or "length")."""

    prompt_index: list[int] = field(default_factory=list)
    response_ids: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    # rollout.partial: per sample, its tokens drawn under each successive weight version
    # when an update crossed the generation (empty: none did, every token the first's)
    segments: list[list[int]] = field(default_factory=list)


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Generation: ...

    def update_weights(self, buckets: Iterable[Bucket]) -> None: ...

    def sleep(self) -> None:
        """Free accelerator memory (weights and KV cache) while the trainer runs."""

    def wake(self) -> None: ...

    def shutdown(self) -> None: ...
