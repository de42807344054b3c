"""Run micro-batches through model chunks with megatron's pipeline schedule (1F1B, or
interleaved with virtual stages; plain loop without PP), forward-only or with backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from distflow_mc.models.spans import forget
from distflow_mc.models.vision import IMAGES

MicroBatch = dict[str, torch.Tensor]
# forward-only: (micro-batch, model output) -> anything, collected on the last stage.
# training: (micro-batch, model output) -> (loss sum, count, metrics); megatron divides the
# gradients by the count summed over all micro-batches and data-parallel ranks.
OutputFn = Callable[[MicroBatch, torch.Tensor], Any]


def _rows(mb: MicroBatch) -> torch.Tensor:
    """A [b, s] tensor of the micro-batch: its tokens, or its attention mask on a pipeline
    stage after the first (it reads the hidden states the schedule hands it, no tokens)."""
    return mb["input_ids"] if "input_ids" in mb else mb["attention_mask"]


def _forward(model: torch.nn.Module, mb: MicroBatch, cp: dist.ProcessGroup | None) -> torch.Tensor:
    """Right-padded [b, s] tokens under the causal mask: padding never reaches real tokens.
    Packed rows (`spans`) give each token its position in its sample and attend within its
    span and its span's prefix (models/spans.py); under context parallelism (`cp`, the
    group) the rank's chunks of each segment attend to their whole segment and the one it
    continues (models/context.py)."""
    if cp is not None:
        plan = torch.stack([mb["spans"], mb["prefixes"], mb["positions"]])
        return model(mb.get("input_ids"), mb["positions"], attention_mask=plan)
    if "spans" not in mb:  # (a vision-language model's: images, 3-D positions)
        images = {k: mb[k] for k in (*IMAGES, "image_mask") if k in mb}
        positions = mb["mrope_positions"].permute(2, 0, 1) if "mrope_positions" in mb else None
        return model(mb.get("input_ids"), positions, attention_mask=None, **images)
    plan = torch.stack([mb["spans"], mb["prefixes"]])  # (models/spans.py)
    return model(mb.get("input_ids"), mb["positions"], attention_mask=plan)


def pad_to(mb: MicroBatch, rows: int, length: int) -> MicroBatch:
    """Zero-pad per-token tensors ([b, s, ...]) to [rows, length, ...] and per-sample ones
    ([b, ...]) to `rows`. Padded rows and tokens carry mask 0 (attention_mask False), so
    they add nothing to any sum the losses take."""
    b, s = _rows(mb).shape[:2]
    out = {k: mb[k] for k in IMAGES if k in mb}  # the micro-batch's images, as they are
    for k, v in mb.items():
        if k in IMAGES:
            continue
        per_token = v.dim() >= 2 and tuple(v.shape[:2]) == (b, s)
        pad = [0, 0] * (v.dim() - (2 if per_token else 1))  # trailing dims stay
        pad += [0, length - s, 0, rows - b] if per_token else [0, rows - b]
        out[k] = torch.nn.functional.pad(v, pad)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def schedule_shapes(
    microbatches: Sequence[MicroBatch], pp: int, interleaved: bool, seq_multiple: int
) -> list[MicroBatch]:
    """The shapes megatron's schedules need. Every micro-batch has at least one row and its
    length is a multiple of `seq_multiple` (TP under sequence parallel: the sequence is
    split over TP ranks). The interleaved schedule exchanges fixed shapes: every micro-batch
    is padded to the largest [rows, length], and all-padding micro-batches are appended
    until the count is a multiple of PP."""
    sizes = [(max(1, _rows(mb).shape[0]), max(1, _rows(mb).shape[1])) for mb in microbatches]
    if not interleaved:
        return [
            pad_to(mb, b, _round_up(s, seq_multiple))
            for mb, (b, s) in zip(microbatches, sizes, strict=True)
        ]
    rows = max(b for b, _ in sizes)
    length = _round_up(max(s for _, s in sizes), seq_multiple)
    shaped = [pad_to(mb, rows, length) for mb in microbatches]
    filler = {k: torch.zeros_like(v) for k, v in shaped[0].items() if k not in IMAGES}
    return shaped + [filler] * (-len(shaped) % pp)


def run_microbatches(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[MicroBatch],
    fn: OutputFn,
    forward_only: bool,
) -> list[Any]:
    """Every rank of a model replica passes the same micro-batches (at least one; one may
    hold no rows, so that a replica with no samples still takes part in the step's
    collectives). Returns fn's outputs (forward-only) or the metrics dicts (training) on the
    last PP stage, one per given micro-batch; [] elsewhere. fn may see a micro-batch padded
    (see `schedule_shapes`); per-token tensor outputs come back cut to its own [b, s].
    Under context parallelism a micro-batch holds the rank's chunks (data/chunks.py), its
    `spans`, `prefixes` and `positions` (data/microbatch.py)."""
    config = chunks[0].config
    seq_multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    pp = config.pipeline_model_parallel_size
    cp = config.context_parallel_size
    group = parallel_state.get_context_parallel_group() if cp > 1 else None
    shaped = schedule_shapes(microbatches, pp, len(chunks) > 1, seq_multiple)

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        output = _forward(model, mb, group)
        if forward_only:
            return output, lambda out, non_loss_data=True: fn(mb, out)
        return output, lambda out: fn(mb, out)

    outputs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=[iter(shaped) for _ in chunks],
        model=list(chunks),
        num_microbatches=len(shaped),
        # (the whole rows' length: megatron divides it by CP, as by TP under SP)
        seq_length=max(_rows(mb).shape[1] for mb in shaped) * cp,
        micro_batch_size=max(_rows(mb).shape[0] for mb in shaped),
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )
    forget()
    outputs = outputs[: len(microbatches)]
    if not forward_only:
        return outputs
    return [
        out[: _rows(mb).shape[0], : _rows(mb).shape[1]]
        if isinstance(out, torch.Tensor) and out.dim() >= 2
        else out
        for mb, out in zip(microbatches, outputs, strict=False)
    ]
