"""Validation: generation on the held-out set (greedy, or `trainer.val_n` samples per
prompt at the rollout temperature), mean reward per data_source over all ranks."""

from __future__ import annotations

from distflow_mc.data.loader import LoaderState
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.stages.rollout import infos, responses, rollouts
from distflow_mc.stages.workers import Workers


def validate(w: Workers, step: int) -> dict[str, float]:
    """On the rollout layout's ranks, with the engines' weights as they are (the actor's
    after step `step`, which also seeds the sampling); reduced over those ranks."""
    m = Metrics()
    if w.val_loader is not None:
        t, r = w.config.trainer, w.config.rollout
        prompts = w.val_loader.batch_at(LoaderState()).batch
        params = SamplingParams(
            n=t.val_n,
            temperature=0.0 if t.val_n == 1 else r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=(w.tokenizer.eos_token_id,),
            seed=t.seed + step,
        )
        batch = rollouts(w, prompts, params)
        o = batch.objects
        scores = w.rewards(responses(w, batch), o["data_source"], o["ground_truth"], infos(batch))
        for source, value in zip(o["data_source"], scores.rewards, strict=True):
            m.add(f"val/{source}/reward", value)
    return m.reduce(w.rollout_group)
