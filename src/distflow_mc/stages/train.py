"""MODEL_TRAIN nodes: actor (policy loss, KL, entropy) and critic (clipped value loss),
`algo.ppo_epochs` x `algo.mini_batches` optimizer steps over the replica's samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from megatron.core import parallel_state

from distflow_mc.algos.correction import Correction
from distflow_mc.algos.losses import aggregate, kl_penalty, value_loss
from distflow_mc.data.batch import Batch
from distflow_mc.models.train import TrainableModel
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.guard import logprob_gap
from distflow_mc.stages.passes import aligned, microbatches, token_logprobs
from distflow_mc.stages.workers import Workers


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().float(), count.detach().float()])


def _optimize(
    w: Workers, model: TrainableModel, batch: Batch, loss_fn: Callable, m: Metrics, prefix: str
) -> None:
    a = w.config.algo
    for _ in range(a.ppo_epochs):
        for mini in np.array_split(np.arange(len(batch)), a.mini_batches):
            sub = batch if a.mini_batches == 1 else batch.select(mini.tolist())
            _, mbs, _ = microbatches(w, sub)
            slots = sum(mb["attention_mask"].numel() for mb in mbs)
            real = sum(int(mb["attention_mask"].sum()) for mb in mbs)
            m.add(f"{prefix}/microbatch_padding", slots - real, slots)  # share of slots
            m.add(f"{prefix}/shared_prefix_saved", sub.num_tokens - real, sub.num_tokens)
            stats = model.step(mbs, loss_fn)
            if w.ctx.rank == 0:  # the same on every rank
                m.add_total(f"{prefix}/nonfinite_skipped_steps", float(stats["nonfinite"]))
                m.add_total(f"{prefix}/empty_skipped_steps", float(stats["empty"]))
            if w.mp.emits_data and not (stats["nonfinite"] or stats["empty"]):
                m.add(f"{prefix}/grad_norm", stats["grad_norm"])
                for metrics in stats["microbatch_metrics"]:
                    for name, pair in metrics.items():
                        key = name if "/" in name else f"{prefix}/{name}"
                        if key.endswith("_max"):
                            m.add_max(key, float(pair[0]))
                        else:
                            m.add(key, float(pair[0]), float(pair[1]))
            m.set(f"{prefix}/lr", stats["lr"])
            for name, value in stats["router"].items():  # MoE: every rank's own routing
                m.add(f"{prefix}/{name}", value)


def actor(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    a, t = w.config.algo, w.config.rollout.temperature
    agg = a.loss_agg.name
    kl_loss = a.kl_coef > 0 and not a.kl_in_reward and w.reference is not None
    # context parallelism: per-sequence rules see the whole sequence (algos/losses.py)
    cp = parallel_state.get_context_parallel_group() if w.mp.cp > 1 else None

    def loss_fn(mb: dict, out: torch.Tensor):
        logp, ent = token_logprobs(out, mb, t, w.arch.vocab_size, entropy=True)
        mask = mb["response_mask"]
        tokens = mask.sum()
        metrics = {}
        if "old_logprobs" in mb:
            old = mb["old_logprobs"]
        else:  # on-policy: the liveness pass dropped the separate ACTOR forward
            old = logp.detach()
            gap = logprob_gap(mb["rollout_logprobs"], old, mask)
            metrics["rollout/logprob_gap_mean"] = _pair(gap["sum"], gap["tokens"])
            metrics["rollout/logprob_gap_max"] = _pair(gap["max"], gap["tokens"])
        segments = mb.get("segments")  # packed rows: several sequences per row
        if w.correction is not None:  # decoupled objective: weighted by pi_prox / pi_behav
            c = w.correction(old, mb["rollout_logprobs"], mask, segments=segments, group=cp)
            metrics |= _correction_metrics(c, tokens)
            mask, tokens = c.mask, c.mask.sum()
        pg, clipped = w.policy_loss(logp, old, mb["advantages"], mask, segments=segments, group=cp)
        if w.correction is not None:
            pg = pg * c.weight
        num, den = aggregate(pg, mask, agg, segments, cp)
        metrics |= {
            "pg_loss": _pair(num, den),
            "clip_frac": _pair((clipped * mask).sum(), tokens),
            "entropy": _pair((ent * mask).sum(), tokens),
        }
        loss = num
        if kl_loss:
            kl = kl_penalty(logp, mb["ref_logprobs"], a.kl_estimator.name)
            loss = loss + a.kl_coef * aggregate(kl, mask, agg, segments, cp)[0]
            metrics["kl"] = _pair((kl * mask).sum(), tokens)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate(ent, mask, agg, segments, cp)[0]
        return loss, den.to(torch.int), metrics

    _optimize(w, w.actor, batch, loss_fn, m, "actor")
    return batch


def _correction_metrics(c: Correction, tokens: torch.Tensor) -> dict:
    """Over the response tokens: the importance weight before truncation (mean, max), the
    share the cap lowered and the share left out."""
    return {
        "is_weight": _pair(c.ratio.sum(), tokens),
        "is_weight_max": _pair(c.ratio.max() if c.ratio.numel() else tokens * 0, tokens),
        "is_truncated_frac": _pair(c.truncated.sum(), tokens),
        "is_masked_frac": _pair(c.masked.sum(), tokens),
    }


def critic(w: Workers, batch: Batch, m: Metrics, step: int) -> Batch:
    clip = w.config.algo.value_clip

    def loss_fn(mb: dict, out: torch.Tensor):
        v = aligned(out[..., 0], mb).float()
        mask = mb["response_mask"]
        per_token = value_loss(v, mb["values"], mb["returns"], clip)
        num, den = aggregate(per_token, mask, "TOKEN_MEAN")
        return num, den.to(torch.int), {"value_loss": _pair(num, den)}

    _optimize(w, w.critic, batch, loss_fn, m, "critic")
    return batch
