"""Forward-only MODEL_INFERENCE nodes on the train layout: reference and old log-probs,
critic values. Results are packed per token and shared by every rank of the replica."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from distflow_mc.config.schema import SharedPrefix
from distflow_mc.data.batch import Batch
from distflow_mc.data.chunks import local_heads, split
from distflow_mc.data.microbatch import (
    Item,
    item_size,
    pack_rows,
    packed_microbatch,
    shared_items,
    split_by_token_budget,
)
from distflow_mc.models.gpt import use_transformer_engine
from distflow_mc.models.logprobs import vocab_parallel_logprobs
from distflow_mc.models.schedule import run_microbatches
from distflow_mc.models.vision import microbatch_images
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.guard import logprob_gap
from distflow_mc.stages.workers import Workers


def microbatches(w: Workers, batch: Batch) -> tuple[list[list[int]], list[dict], list]:
    """Token-budget micro-batches, right-padded; at least one (with no rows when the batch
    is empty: the replica still runs the step's collectives). Interleaved pipelines want a
    count that is a multiple of PP; under context parallelism the batch holds the rank's
    chunks (data/chunks.py) and the budget counts them. With `trainer.shared_prefix`, a
    group's samples share rows (their prompt once); with `trainer.sequence_packing`, rows
    hold several samples (or groups) end to end, as long as the longest. Returns each
    micro-batch's samples, in its order, the micro-batches, and where each of their tokens
    sits in the micro-batch's flattened [b, s]."""
    t = w.config.trainer
    multiple = w.mp.pp if w.mp.vpp else 1
    lengths = batch.lengths.tolist()
    cp = w.mp.cp
    # context parallelism: a sample's prompt part and the rest attend as two spans
    heads = local_heads(batch, cp) if cp > 1 else [0] * len(batch)
    items = [Item((i,), heads[i]) for i in range(len(batch))]
    # AUTO only where the math is the flat rows' exactly: not under an MoE router's
    # load-balancing loss (it counts the tokens it routes: a shared prompt once), and where
    # spans run (the local layer spec, no images)
    auto = not use_transformer_engine(w.config.model.layer_spec.value)
    auto &= w.config.model.router_aux_loss_coef == 0 and "images" not in batch.objects
    shared = t.shared_prefix is SharedPrefix.ALWAYS or (
        t.shared_prefix is SharedPrefix.AUTO and auto
    )
    if shared and "prompt_length" in batch.samples:
        keys = groups = batch.samples["group"].tolist()
        prompts = batch.samples["prompt_length"].tolist()
        if cp > 1:  # a group's prompt parts are alike where their prompts' lengths are
            keys, prompts = (
                list(zip(groups, split(batch).tolist(), strict=True)),
                [h + 1 for h in heads],
            )
        ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        share = AUTO_MIN_SHARE if t.shared_prefix is SharedPrefix.AUTO else 0.0
        items = shared_items(lengths, [ids[k] for k in keys], prompts, t.micro_batch_tokens, share)
        items = [i if len(i.samples) > 1 else Item(i.samples, heads[i.samples[0]]) for i in items]
    sizes = [item_size(item, lengths) for item in items]
    rows = pack_rows(sizes) if t.sequence_packing else [[k] for k in range(len(items))]
    used = [sum(sizes[k] for k in row) for row in rows]
    parts = split_by_token_budget(used, t.micro_batch_tokens, multiple) or [[]]
    pad = w.tokenizer.pad_token_id
    built = [
        packed_microbatch(batch, [[items[k] for k in rows[r]] for r in g], pad, cp > 1)
        for g in parts
    ]
    samples = [[i for r in g for k in rows[r] for i in items[k].samples] for g in parts]
    mbs = [mb for mb, _ in built]
    if "images" in batch.objects:  # (a first pipeline stage's: it embeds them)
        for mb, part in zip(mbs, samples, strict=True):
            images = [batch.objects["images"][i] for i in part]
            mb.update(microbatch_images(images, w.arch.vision.merge, batch.offsets.device))
    return samples, mbs, [places for _, places in built]


# trainer.shared_prefix=AUTO shares prompts when that saves at least this share of the
# tokens (bench_shared_prefix.py, 4M-parameter model on CPU: 22% saved ran 1.33x as fast,
# 17% 1.05x, 7% 0.93x)
AUTO_MIN_SHARE = 0.2


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Outputs at position t describe token t+1: move them onto token t+1 (0 at t=0)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def aligned(x: torch.Tensor, mb: dict) -> torch.Tensor:
    """Per-position outputs where mb's per-token fields are: on the token they describe,
    or, in a context-parallel rank's chunks (its fields already at the predicting position,
    its `labels` given; data/chunks.py), where they are."""
    return x if "labels" in mb else shift_right(x)


def token_logprobs(
    out: torch.Tensor, mb: dict, temperature: float, vocab_size: int, entropy: bool = False
):
    """Log-probs (and entropies) of mb's own tokens under the model (whose vocabulary may
    be padded past the tokenizer's `vocab_size`), aligned with mb's fields."""
    labels = mb["labels"] if "labels" in mb else mb["input_ids"].roll(-1, dims=1)
    logp, ent = vocab_parallel_logprobs(out, labels, temperature, entropy, vocab_size)
    return aligned(logp, mb), aligned(ent, mb) if entropy else None


def pack(
    w: Workers, batch: Batch, parts: list[list[int]], places: list, dense: list
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
        for part, where, values in zip(parts, places, dense, strict=True):
            _, rows = batch.token_index(torch.tensor(part, dtype=torch.int64, device=device))
            packed[rows] = values.flatten()[where].float()
    if shared:
        last = dist.get_process_group_ranks(w.mp.pp_group)[-1]
        dist.broadcast(packed, src=last, group=w.mp.pp_group)
    return packed


def _forward(w: Workers, batch: Batch, run: Callable, fn: Callable, name: str) -> None:
    """batch.tokens[name]: fn's per-token values on the ranks that read them."""
    parts, mbs, places = microbatches(w, batch)
    packed = pack(w, batch, parts, places, run(mbs, fn))
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
    _forward(w, batch, w.critic.forward, lambda mb, out: aligned(out[..., 0], mb), "values")
    return batch
