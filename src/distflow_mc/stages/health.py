"""Checks on each step's reduced metrics. The record is the same on every rank, so every
rank takes the same decision with no collective of its own: say when prompts are skipped,
say when a step had nothing to learn from, and stop a run that has had no usable sample,
or only error scores as rewards, for too many steps in a row."""

from __future__ import annotations

import logging

from distflow_mc.config.schema import Config

log = logging.getLogger(__name__)


class Health:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.empty = 0  # steps in a row with no usable sample
        self.failing = 0  # steps in a row whose rewards were all error scores
        self.skipped = False  # some prompt was skipped before (said once)

    def check(self, record: dict[str, float], failed_sources: list[str]) -> None:
        """Warn about this step; ValueError (on every rank alike) past a limit."""
        self._skips(record)
        self._empty(record)
        self._rewards(record, failed_sources)

    def _skips(self, record: dict[str, float]) -> None:
        """The first step that skips prompts says so; from then on they are counted on
        the progress bar and in the metrics (`data/skipped_prompts`)."""
        skipped = record.get("data/skipped_prompts", 0.0)
        if skipped and not self.skipped:
            log.warning(
                "step %d skipped %s (counted from now on as data/skipped_prompts)",
                record["step"],
                _why(record, self.config),
            )
        self.skipped |= bool(skipped)

    def _empty(self, record: dict[str, float]) -> None:
        if record.get("rollout/samples", 1.0):
            self.empty = 0
            return
        self.empty += 1
        limit = self.config.data.max_empty_steps
        skipped = bool(record.get("data/skipped_prompts"))
        what = (
            f"no usable sample on any rank: {_why(record, self.config)}"
            if skipped
            else "no group kept on any rank (algo.dynamic_sampling drops groups whose"
            " rewards are all equal)"
        )
        change = (
            "data.max_prompt_length or data.train_files"
            if skipped
            else "algo.dynamic_sampling_max_rounds, rollout.n or the reward (every group's"
            " samples score alike)"
        )
        if self.empty >= limit:
            raise ValueError(
                f"{self.empty} step{'s' * (self.empty > 1)} in a row with {what}"
                f" (data.max_empty_steps={limit});"
                f" nothing is learning: change {change}"
            )
        log.warning(
            "step %d: %s; no update this step (%d of data.max_empty_steps=%d in a row)",
            record["step"],
            what,
            self.empty,
            limit,
        )

    def _rewards(self, record: dict[str, float], failed_sources: list[str]) -> None:
        scored = record.get("reward/samples", 0.0)
        timeouts = record.get("reward/timeouts", 0.0)
        failed = timeouts + record.get("reward/errors", 0.0)
        if not scored or failed < scored:
            self.failing = 0
            return
        self.failing += 1
        r = self.config.reward
        if self.failing < r.max_failing_steps:
            return
        scorer = (
            f"reward.fn={r.fn}" if r.fn else f"the built-in scorer of data_source {failed_sources}"
        )
        state = "is not answering" if timeouts == failed else "fails on every sample"
        raise ValueError(
            f"every reward of the last {self.failing} steps scored reward.error_score="
            f"{r.error_score} (reward.max_failing_steps={r.max_failing_steps}; this step:"
            f" {timeouts:.0f} of {scored:.0f} timed out after reward.timeout_s={r.timeout_s},"
            f" {failed - timeouts:.0f} failed): {scorer} {state}, and a run whose rewards are"
            " all error scores is not learning"
        )


def _why(record: dict[str, float], config: Config) -> str:
    overlong = record.get("data/overlong_prompts", 0.0)
    malformed = record.get("data/malformed_rows", 0.0)
    return (
        f"{overlong + malformed:.0f} prompts, {overlong:.0f} longer than"
        f" data.max_prompt_length={config.data.max_prompt_length} tokens and {malformed:.0f}"
        " malformed"
    )
