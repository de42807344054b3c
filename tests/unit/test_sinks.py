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
