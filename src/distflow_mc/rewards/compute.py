"""Score responses with time budgets, in worker processes: a scorer that raises, returns
something that is not a finite number, or runs past `reward.timeout_s` gives that sample
`reward.error_score` and is counted; it never stops the run or hangs a rank.

Each worker takes a contiguous share of the batch (one message out) and sends each score
back as it finishes, so the parent knows which sample every worker is on and since when.
A sample past its budget is scored as a timeout, its worker is killed (threads could only
be abandoned, and Python joins them at exit) and a fresh one takes the rest of the share.
Stuck samples spend their budgets concurrently, one per worker: with every scorer hanging,
a call costs `reward.timeout_s` x ceil(samples / workers), and the others keep their scores.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
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
    "hiyouga/geometry3k": math_reward.score,  # verl's geo3k (vision-language)
    "format": fmt.score,
    "tiny_copy": tiny_copy.score,
    "tiny_lookup": tiny_lookup.score,
}


@dataclass
class Scores:
    rewards: list[float]
    errors: int  # raised, or not a finite number
    timeouts: int


def _score(fn_path: str | None, data_source: str, response: str, truth: Any, info: dict) -> Any:
    """Runs in a worker process: resolve the scorer there (functions need not pickle). A
    scorer that raises gives its sample the exception (the others keep their scores)."""
    try:
        fn = import_fn(fn_path) if fn_path else BUILT_IN[data_source]
        return float(fn(response, truth, info))
    except Exception as e:  # a scorer's bug must not end the run
        return RuntimeError(f"{type(e).__name__}: {e}")


def _serve(conn: Connection, parent_end: Connection) -> None:
    """A worker's loop: score each share it is sent, one answer per sample as it ends."""
    parent_end.close()  # so that the parent's exit reads as end-of-file here
    while True:
        try:
            share = conn.recv()
        except EOFError:
            return
        for i, args in share:
            conn.send((i, _score(*args)))


class _Worker:
    """One scoring process, and the samples it was sent and has not answered, in order."""

    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        # daemonic: a worker stuck in a scorer never keeps the rank alive at exit
        self.process = context.Process(target=_serve, args=(child, self.conn), daemon=True)
        self.process.start()
        child.close()
        self.todo: list[int] = []
        self.since = 0.0  # when its current sample began

    def send(self, indices: list[int], args: list[tuple]) -> None:
        self.todo, self.since = indices, time.monotonic()
        self.conn.send([(i, args[i]) for i in indices])

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


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
        # forked like a data loader's workers (no imports to pay; scorers touch no torch
        # or process-group state); started on first use, kept across calls
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.context = mp.get_context(method)
        self.pool: list[_Worker] = []
        self.failed_sources: list[str] = []  # of the last call's error scores

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
        while len(self.pool) < min(self.workers, len(args)):
            self.pool.append(_Worker(self.context))
        share = -(-len(args) // max(len(self.pool), 1))  # one message per worker
        for k, worker in enumerate(self.pool):
            if k * share < len(args):
                worker.send(list(range(k * share, min((k + 1) * share, len(args)))), args)
        timeouts = 0
        budget = self.config.timeout_s
        while busy := [w for w in self.pool if w.todo]:
            left = min(w.since for w in busy) + budget - time.monotonic()
            for conn in wait([w.conn for w in busy], max(left, 0.0)):
                self._receive(next(w for w in busy if w.conn is conn), out, args)
            for k, worker in enumerate(self.pool):
                late = time.monotonic() - worker.since >= budget
                if worker.todo and late and not worker.conn.poll():  # no answer waiting
                    out[worker.todo[0]] = TimeoutError(f"exceeded reward.timeout_s={budget}")
                    timeouts += 1
                    self._replace(k, args)
        return self._scores(out, data_sources, timeouts)

    def _receive(self, worker: _Worker, out: list, args: list[tuple]) -> None:
        """The worker's next answer. A worker that died (a scorer that exits or crashes
        the process) scores its current sample as an error and is replaced."""
        try:
            i, result = worker.conn.recv()
        except EOFError:
            worker.process.join()
            code = worker.process.exitcode
            out[worker.todo[0]] = RuntimeError(f"the scoring process died (exit code {code})")
            self._replace(self.pool.index(worker), args)
            return
        assert i == worker.todo[0], (i, worker.todo)
        out[i] = result
        worker.todo.pop(0)
        worker.since = time.monotonic()

    def _replace(self, k: int, args: list[tuple]) -> None:
        """Kill worker k, whose current sample is settled; a fresh one takes the rest of
        its share."""
        old = self.pool[k]
        old.kill()
        self.pool[k] = _Worker(self.context)
        if old.todo[1:]:
            self.pool[k].send(old.todo[1:], args)

    def _scores(self, out: list, data_sources: Sequence[str], timeouts: int) -> Scores:
        """Finite numbers are rewards; anything else scores reward.error_score, with one
        warning per call (per step) that counts them."""
        rewards, sources, example = [], Counter(), None
        for value, source in zip(out, data_sources, strict=True):
            if isinstance(value, float) and math.isfinite(value):
                rewards.append(value)
                continue
            rewards.append(self.config.error_score)
            sources[source] += 1
            if example is None and not isinstance(value, TimeoutError):
                example = (
                    f"{type(value).__name__}: {value}" if isinstance(value, Exception) else value
                )
        errors = sum(sources.values()) - timeouts
        if sources:
            log.warning(
                "%d of %d rewards scored reward.error_score=%s: %d timed out (reward.timeout_s=%s),"
                " %d failed%s; data_source %s",
                timeouts + errors,
                len(out),
                self.config.error_score,
                timeouts,
                self.config.timeout_s,
                errors,
                f" (e.g. {example})" if example else "",
                ", ".join(f"'{s}' ({n})" for s, n in sources.items()),
            )
        self.failed_sources = sorted(sources)
        return Scores(rewards, errors, timeouts)

    def close(self) -> None:
        for worker in self.pool:
            worker.kill()
        self.pool = []
