"""Score responses with time budgets: a scorer that raises or runs out of time gives that
sample `reward.error_score` and a counted warning; it never stops the run or hangs a rank
(a stuck scorer thread is abandoned, not waited for)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from distflow_mc.config.schema import RewardConfig
from distflow_mc.dag.validate import import_fn
from distflow_mc.rewards import fmt, gsm8k, math, tiny_copy

log = logging.getLogger(__name__)
Scorer = Callable[[str, Any, dict], float]

BUILT_IN: dict[str, Scorer] = {
    "openai/gsm8k": gsm8k.score,
    "gsm8k": gsm8k.score,
    "math": math.score,
    "lighteval/MATH": math.score,
    "DigitalLearningGmbH/MATH-lighteval": math.score,
    "format": fmt.score,
    "tiny_copy": tiny_copy.score,
}


@dataclass
class Scores:
    rewards: list[float]
    errors: int
    timeouts: int


class RewardComputer:
    def __init__(self, config: RewardConfig, workers: int = 4) -> None:
        self.config, self.workers = config, workers
        self.custom: Scorer | None = None
        if config.fn:
            try:
                self.custom = import_fn(config.fn)
            except ValueError as e:
                raise ValueError(f"reward.fn: {e}") from e
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reward")

    def scorer(self, data_source: str) -> Scorer:
        if self.custom is not None:
            return self.custom
        if data_source not in BUILT_IN:
            raise ValueError(
                f"no reward for data_source '{data_source}' (built in: {', '.join(BUILT_IN)});"
                " set reward.fn to a dotted path fn(response, ground_truth, extra_info)"
            )
        return BUILT_IN[data_source]

    def __call__(
        self,
        responses: Sequence[str],
        data_sources: Sequence[str],
        ground_truths: Sequence[Any],
        extra_infos: Sequence[dict],
    ) -> Scores:
        scorers = [self.scorer(ds) for ds in data_sources]
        futures = [
            self.pool.submit(fn, r, gt, info)
            for fn, r, gt, info in zip(scorers, responses, ground_truths, extra_infos, strict=True)
        ]
        rewards, errors, timeouts = [], 0, 0
        for future, source in zip(futures, data_sources, strict=True):
            # after one timeout a worker may be stuck: take only what has already finished
            wait = 0.0 if timeouts else self.config.timeout_s
            try:
                rewards.append(float(future.result(timeout=wait)))
            except FutureTimeout:
                timeouts += 1
                rewards.append(self.config.error_score)
            except Exception as e:  # a scorer's bug must not end the run
                errors += 1
                log.warning(
                    "reward for data_source '%s' raised %s: %s", source, type(e).__name__, e
                )
                rewards.append(self.config.error_score)
        if timeouts:
            log.warning(
                "%d reward(s) exceeded reward.timeout_s=%s", timeouts, self.config.timeout_s
            )
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="reward")
        return Scores(rewards, errors, timeouts)
