"""Step metrics: every rank adds (sum, count) pairs; one all-gather per step turns them
into global means; rank 0 appends them to a JSONL file."""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch.distributed as dist


class Metrics:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)  # summed over ranks
        self.maxima: dict[str, float] = {}  # max over ranks
        self.local: dict[str, float] = {}  # this rank's own (times, lr): no reduce

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] += float(value)

    def add_max(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, float("-inf")), float(value))

    def set(self, name: str, value: float) -> None:
        self.local[name] = float(value)

    def parts(self) -> tuple[dict[str, float], ...]:
        """What `reduce` gathers from a rank (and `absorb` takes): sums, counts, totals,
        maxima."""
        return dict(self.sums), dict(self.counts), dict(self.totals), dict(self.maxima)

    def absorb(self, parts: tuple[dict[str, float], ...]) -> None:
        """Add another rank's `parts` to this rank's, as if recorded here."""
        sums, counts, totals, maxima = parts
        for into, part in ((self.sums, sums), (self.counts, counts), (self.totals, totals)):
            for name, value in part.items():
                into[name] += value
        for name, value in maxima.items():
            self.add_max(name, value)

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Global means, totals and maxima over the ranks of `group` (None: all), from one
        all_gather_object of every rank's (ranks may hold different names), summed in rank
        order."""
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, self.parts(), group=group)
        total = Metrics()
        for parts in every:
            total.absorb(parts)
        # a mean over nothing (no sample anywhere this step) is left out, not logged as NaN
        c = total.counts
        out = {n: total.sums[n] / c[n] for n in sorted(total.sums) if c[n]}
        out.update(sorted(total.totals.items()))
        out.update(sorted(total.maxima.items()))
        return {**out, **self.local}


def derived(r: dict[str, float]) -> dict[str, float]:
    """A step's reduced record with the metrics made from others (in place)."""
    if "reward/sq" in r:
        r["reward/std"] = max(r.pop("reward/sq") - r["reward/mean"] ** 2, 0.0) ** 0.5
    if "data/malformed_rows" in r:
        r["data/skipped_prompts"] = r["data/malformed_rows"] + r["data/overlong_prompts"]
    if "rollout/generated_tokens" in r and "time/step" in r:
        r["throughput/generated_tokens_per_s"] = r["rollout/generated_tokens"] / r["time/step"]
        r["throughput/total_tokens_per_s"] = r["rollout/total_tokens"] / r["time/step"]
    return r


class Sinks:
    """Where rank 0 sends each step's metrics: JSONL always; TensorBoard, Weights &
    Biases and a progress bar as configured."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        first_step: int,
        tensorboard: bool,
        wandb_project: str | None,
        progress_bar: bool,
        name: str,
    ) -> None:
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.tb = self.wandb = self.bar = None
        self.skipped = 0.0  # prompts skipped so far, shown on the bar
        if tensorboard:
            from torch.utils.tensorboard.writer import FileWriter

            self.tb = FileWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=name, dir=str(run_dir))
        self.stack = ExitStack()
        if progress_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc=name, dynamic_ncols=True)
            self.stack.enter_context(logging_redirect_tqdm())  # log lines above the bar

    def write(self, record: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.tb is not None:  # one event per step (one per scalar costs 10x the time)
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
            self.tb.add_summary(Summary(value=values), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.bar is not None:
            shown = {
                "reward": f"{record['reward/mean']:.3f}" if "reward/mean" in record else "-",
                "tok_s": f"{record.get('throughput/total_tokens_per_s', float('nan')):.0f}",
            }
            if "agent/tool_call_rate" in record:  # agent rollouts
                shown["calls"] = f"{record['agent/tool_call_rate']:.2f}"
            if "staleness/mean" in record:  # rollout.placement=SEPARATE
                shown["lag"] = f"{record['staleness/mean']:.1f}"
                idle = (record.get(f"{g}/idle_frac", float("nan")) for g in ("rollout", "train"))
                shown["idle"] = "/".join(f"{x:.2f}" for x in idle)  # rollout / train group
            self.skipped += record.get("data/skipped_prompts", 0.0)
            if self.skipped:
                shown["skipped"] = f"{self.skipped:.0f}"
            self.bar.set_postfix(shown)
            self.bar.update(1)

    def close(self) -> None:
        self.stack.close()
        for sink in (self.tb, self.bar):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()
