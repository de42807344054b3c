"""Score responses with time budgets, in worker processes: a scorer that raises, returns
something that is not a finite number, or runs past `reward.timeout_s` gives that sample
`reward.error_score` and is counted; it never stops the run or hangs a rank. Each worker
scores a share of the batch (one round trip each) with one budget per sample in it; when a
share runs out of time its worker is killed (threads could only be abandoned, and Python
joins them at exit) and the unscored samples run again one per job on fresh workers, each
with its own budget, so only the stuck one is scored as a timeout."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

from distflow_mc.config.schema import RewardConfig
from distflow_mc.dag.validate import import_fn
from distflow_mc.rewards import fmt, gsm8k, tiny_copy, tiny_lookup
from distflow_mc.rewards import math as math_reward

log = logging.getLogger(__name__)
Scorer = Callable[[str, Any, dict], float]

BUILT_IN: dict[str, Scorer] = {
    "openai/gsm8k": gsm8k.score,
    "gsm8k": gsm8k.score,
    "math": math_reward.score,
    "lighteval/MATH": math_reward.score,
    "DigitalLearningGmbH/MATH-lighteval": math_reward.score,
    "format": fmt.score,
    "tiny_copy": tiny_copy.score,
    "tiny_lookup": tiny_lookup.score,
}


@dataclass
class Scores:
    rewards: list[float]
    errors: int  # raised, or not a finite number
    timeouts: int


def _score(fn_path: str | None, data_source: str, response: str, truth: Any, info: dict) -> float:
    """Runs in a worker process: resolve the scorer there (functions need not pickle)."""
    fn = import_fn(fn_path) if fn_path else BUILT_IN[data_source]
    return float(fn(response, truth, info))


def _score_many(args: list[tuple]) -> list[Any]:
    """A worker's share, one sample after another; a scorer that raises gives its sample
    the exception (the others keep their scores)."""
    out: list[Any] = []
    for a in args:
        try:
            out.append(_score(*a))
        except Exception as e:  # a scorer's bug must not end the run
            out.append(RuntimeError(f"{type(e).__name__}: {e}"))
    return out


def check_sources(config: RewardConfig, data_sources: set[str], files: str) -> None:
    """Every data_source has a scorer, or reward.fn is set; ValueError names the missing
    ones and where they came from (checked on every rank before any model is built)."""
    missing = sorted(data_sources - set(BUILT_IN)) if config.fn is None else []
    if missing:
        raise ValueError(
            f"no reward for data_source {missing} in {files} (built in: {', '.join(BUILT_IN)});"
            " set reward.fn to a dotted path fn(response, ground_truth, extra_info)"
        )


class RewardComputer:
    def __init__(self, config: RewardConfig, workers: int = 4) -> None:
        self.config, self.workers = config, workers
        if config.fn:
            try:
                import_fn(config.fn)
            except ValueError as e:
                raise ValueError(f"reward.fn: {e}") from e
        self.pool: Pool | None = None

    def _pool(self) -> Pool:
        # forked like a data loader's workers (no imports to pay; scorers touch no torch
        # or process-group state), daemonic: a worker never keeps the rank alive at exit
        if self.pool is None:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(self.workers)
        return self.pool

    def _kill_pool(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def __call__(
        self,
        responses: Sequence[str],
        data_sources: Sequence[str],
        ground_truths: Sequence[Any],
        extra_infos: Sequence[dict],
    ) -> Scores:
        args = [
            (self.config.fn, source, response, truth, info)
            for response, source, truth, info in zip(
                responses, data_sources, ground_truths, extra_infos, strict=True
            )
        ]
        out: list[Any] = [None] * len(args)
        timeouts = 0
        pending = list(range(len(args)))
        share = -(-len(pending) // self.workers)  # one job per worker while all goes well
        while pending:
            pool = self._pool()
            parts = [pending[i : i + share] for i in range(0, len(pending), share)]
            jobs = [
                (part, pool.apply_async(_score_many, ([args[i] for i in part],))) for part in parts
            ]
            stuck = self._collect(jobs, out)
            if stuck is None:
                break
            self._kill_pool()  # the stuck worker dies; the rest run again on fresh workers
            if len(stuck) == 1:
                timeouts += 1
                out[stuck[0]] = TimeoutError(f"exceeded reward.timeout_s={self.config.timeout_s}")
            pending, share = [i for i in pending if out[i] is None], 1  # isolate the stuck one
        return self._scores(out, data_sources, timeouts)

    def _collect(self, jobs: list[tuple[list[int], AsyncResult]], out: list) -> list[int] | None:
        """Results in order, each job waited for up to one budget per sample in it, from
        when its wait began (the others run meanwhile). Returns the first job that ran out
        of time, or None."""
        for part, job in jobs:
            try:
                results = job.get(timeout=self.config.timeout_s * len(part))
            except mp.TimeoutError:
                return part
            for i, result in zip(part, results, strict=True):
                out[i] = result
        return None

    def _scores(self, out: list, data_sources: Sequence[str], timeouts: int) -> Scores:
        """Finite numbers are rewards; anything else scores reward.error_score, with one
        warning per data source."""
        rewards, problems = [], {}
        for value, source in zip(out, data_sources, strict=True):
            if isinstance(value, float) and math.isfinite(value):
                rewards.append(value)
                continue
            rewards.append(self.config.error_score)
            what = f"{type(value).__name__}: {value}" if isinstance(value, Exception) else value
            problems.setdefault(source, []).append(what)
        for source, whats in problems.items():
            log.warning(
                "%d reward(s) for data_source '%s' scored reward.error_score=%s (e.g. %s)",
                len(whats),
                source,
                self.config.error_score,
                whats[0],
            )
        return Scores(rewards, sum(map(len, problems.values())) - timeouts, timeouts)

    def close(self) -> None:
        self._kill_pool()
