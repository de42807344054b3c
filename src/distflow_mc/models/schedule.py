"""Run micro-batches through model chunks with megatron's pipeline schedule (1F1B, or
interleaved with virtual stages; plain loop without PP), forward-only or with backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

MicroBatch = dict[str, torch.Tensor]
# forward-only: (micro-batch, model output) -> anything, collected on the last stage.
# training: (micro-batch, model output) -> (loss sum, count, metrics); megatron divides the
# gradients by the count summed over all micro-batches and data-parallel ranks.
OutputFn = Callable[[MicroBatch, torch.Tensor], Any]


def _forward(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Right-padded [b, s] tokens under the causal mask: padding never reaches real tokens."""
    tokens = mb["input_ids"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, attention_mask=None)


def pad_to_length(mb: MicroBatch, length: int) -> MicroBatch:
    """Right-pad every per-token tensor ([b, s, ...]) with zeros to `length` tokens."""
    s = mb["input_ids"].shape[1]
    return {
        k: torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, length - s))
        if v.dim() >= 2 and v.shape[1] == s
        else v
        for k, v in mb.items()
    }


def run_microbatches(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[MicroBatch],
    fn: OutputFn,
    forward_only: bool,
) -> list[Any]:
    """Every rank of a model replica passes the same micro-batches. Returns fn's outputs
    (forward-only) or the metrics dicts (training) on the last PP stage; [] elsewhere.
    With virtual pipeline stages, fn sees micro-batches right-padded to the longest one:
    per-token masks in them are padded with zeros."""

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        output = _forward(model, mb)
        if forward_only:
            return output, lambda out, non_loss_data=True: fn(mb, out)
        return output, lambda out: fn(mb, out)

    longest = max(mb["input_ids"].shape[1] for mb in microbatches)
    if len(chunks) > 1:  # interleaved schedule: fixed shapes (see models/gpt.py)
        microbatches = [pad_to_length(mb, longest) for mb in microbatches]
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=[iter(microbatches) for _ in chunks],
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=longest,
        micro_batch_size=microbatches[0]["input_ids"].shape[0],
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )
