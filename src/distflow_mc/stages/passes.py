"""Forward-only MODEL_INFERENCE nodes on the train layout: reference and old log-probs,
critic values. Results are packed per token and shared by every rank of the replica."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from distflow_mc.data.batch import Batch
from distflow_mc.data.microbatch import (
    pack_rows,
    packed_microbatch,
    pad_microbatch,
    split_by_token_budget,
)
from distflow_mc.models.logprobs import vocab_parallel_logprobs
from distflow_mc.models.schedule import run_microbatches
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.guard import logprob_gap
from distflow_mc.stages.workers import Workers


def microbatches(w: Workers, batch: Batch) -> tuple[list[list[int]], list[dict]]:
    """Token-budget micro-batches, right-padded; at least one (with no rows when the batch
    is empty: the replica still runs the step's collectives). Interleaved pipelines want a
    count that is a multiple of PP. With `trainer.sequence_packing`, the budget splits
    packed rows (samples end to end, as long as the longest sample). Returns each
    micro-batch's samples, in its order, and the micro-batches."""
    t = w.config.trainer
    multiple = w.mp.pp if w.mp.vpp else 1
    pad = w.tokenizer.pad_token_id
    lengths = batch.lengths.tolist()
    if not t.sequence_packing:
        parts = split_by_token_budget(lengths, t.micro_batch_tokens, multiple) or [[]]
        return parts, [pad_microbatch(batch, p, pad_value=pad) for p in parts]
    rows = pack_rows(lengths)
    used = [sum(lengths[i] for i in row) for row in rows]
    groups = split_by_token_budget(used, t.micro_batch_tokens, multiple) or [[]]
    mbs = [packed_microbatch(batch, [rows[r] for r in g], pad_value=pad) for g in groups]
    return [[i for r in g for i in rows[r]] for g in groups], mbs


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Outputs at position t describe token t+1: move them onto token t+1 (0 at t=0)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def token_logprobs(
    out: torch.Tensor, mb: dict, temperature: float, vocab_size: int, entropy: bool = False
):
    """Token-aligned log-probs (and entropies) of mb's own tokens under the model (whose
    vocabulary may be padded past the tokenizer's `vocab_size`)."""
    labels = mb["input_ids"].roll(-1, dims=1)
    logp, ent = vocab_parallel_logprobs(out, labels, temperature, entropy, vocab_size)
    return shift_right(logp), shift_right(ent) if entropy else None


def pack(
    w: Workers, batch: Batch, parts: list[list[int]], mbs: list[dict], dense: list
) -> torch.Tensor | None:
    """Dense per-micro-batch outputs (last PP stage) -> packed [tokens], on the ranks of
    the replica that read it: the last stage's, or every stage's when some node has its
    own fn (None elsewhere)."""
    device = batch.offsets.device
    shared = w.mp.pp > 1 and w.stage_reads is None
    if not (w.mp.is_last_stage or shared):
        return None
    packed = torch.zeros(batch.num_tokens, dtype=torch.float32, device=device)
    if w.mp.is_last_stage:
        for part, mb, values in zip(parts, mbs, dense, strict=True):
            _, rows = batch.token_index(torch.tensor(part, dtype=torch.int64, device=device))
            packed[rows] = values[mb["attention_mask"]].float()
    if shared:
        last = dist.get_process_group_ranks(w.mp.pp_group)[-1]
        dist.broadcast(packed, src=last, group=w.mp.pp_group)
    return packed


def _forward(w: Workers, batch: Batch, run: Callable, fn: Callable, name: str) -> None:
    """batch.tokens[name]: fn's per-token values on the ranks that read them."""
    parts, mbs = microbatches(w, batch)
    packed = pack(w, batch, parts, mbs, run(mbs, fn))
    if packed is not None:
        batch.tokens[name] = packed


def ref_logprobs(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    t = w.config.rollout.temperature
    chunks = w.reference

    def run(mbs, fn):
        with torch.no_grad():
            return run_microbatches(chunks, mbs, fn, forward_only=True)

    v = w.arch.vocab_size
    _forward(w, batch, run, lambda mb, out: token_logprobs(out, mb, t, v)[0], "ref_logprobs")
    return batch


def old_logprobs(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    t = w.config.rollout.temperature
    v = w.arch.vocab_size
    run = w.actor.forward
    _forward(w, batch, run, lambda mb, out: token_logprobs(out, mb, t, v)[0], "old_logprobs")
    if w.mp.emits_data:
        logp = batch.tokens["old_logprobs"]
        gap = logprob_gap(batch.tokens["rollout_logprobs"], logp, batch.tokens["response_mask"])
        m.add("rollout/logprob_gap_mean", float(gap["sum"]), float(gap["tokens"]))
        m.add_max("rollout/logprob_gap_max", float(gap["max"]))
    return batch


def values(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    _forward(w, batch, w.critic.forward, lambda mb, out: shift_right(out[..., 0]), "values")
    return batch
