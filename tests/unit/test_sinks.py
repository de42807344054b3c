"""Rank 0's metric sinks, read back by their own readers: JSONL, and TensorBoard's event
accumulator sees every scalar of every step."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distflow_mc.observability.metrics import Sinks


def test_jsonl_and_tensorboard_hold_every_scalar(tmp_path):
    sinks = Sinks(tmp_path, 3, 0, True, None, False, "t")
    records = [
        {"step": s, "reward/mean": 0.1 * s, "time/step": 1.0 + s, "note": "x"} for s in (1, 2, 3)
    ]
    for record in records:
        sinks.write(record)
    sinks.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["reward/mean", "time/step"]
    for tag in ("reward/mean", "time/step"):
        got = [(e.step, round(e.value, 5)) for e in events.Scalars(tag)]
        assert got == [(r["step"], round(r[tag], 5)) for r in records]


def test_the_bar_shows_both_groups_under_the_separate_placement(tmp_path):
    """The progress bar: reward and tokens/s always; under rollout.placement=SEPARATE the
    staleness and each group's idle fraction (rollout / train) too."""
    sinks = Sinks(tmp_path, 2, 0, False, None, True, "t")
    sinks.write({"step": 1, "reward/mean": 0.25, "throughput/total_tokens_per_s": 900.0})
    assert "reward=0.250" in sinks.bar.postfix and "idle" not in sinks.bar.postfix
    sinks.write(
        {
            "step": 2,
            "reward/mean": 0.5,
            "staleness/mean": 1.0,
            "rollout/idle_frac": 0.1,
            "train/idle_frac": 0.45,
        }
    )
    assert "lag=1.0" in sinks.bar.postfix and "idle=0.10/0.45" in sinks.bar.postfix
    sinks.close()
