"""The engine-vs-actor log-prob guard: values over masked tokens, and a warning when large."""

from __future__ import annotations

import logging

import torch

from distflow_mc.rollout.guard import logprob_gap, warn_on_gap


def test_gap_over_masked_tokens(caplog):
    engine = torch.tensor([[0.0, -1.0, -2.0, -9.0]])
    actor = torch.tensor([[5.0, -1.5, -2.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    gap = {k: float(v) for k, v in logprob_gap(engine, actor, mask).items()}
    assert gap == {"sum": 0.5, "max": 0.5, "tokens": 2.0}
    record = {"rollout/logprob_gap_mean": 0.25, "rollout/logprob_gap_max": 0.5}
    with caplog.at_level(logging.WARNING):
        warn_on_gap(record, warn_above=0.5)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        warn_on_gap(record, warn_above=0.1)
    assert "rollout.logprob_gap_warn=0.1" in caplog.text
