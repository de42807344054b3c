"""What the rollout.stream test plugs into a real run: a tool that stalls chosen prompts,
and the built-in advantage node after writing down which groups each step trains."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from distflow_mc.data.batch import Batch
from distflow_mc.data.tiny import Lookup
from distflow_mc.observability.metrics import Metrics
from distflow_mc.stages import advantage as builtin
from distflow_mc.stages.workers import Workers


class StallLookup(Lookup):
    """The lookup tool, answering key 7 after 1.5 s (a few steps' time)."""

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> str:
        if arguments["key"] == "7":
            time.sleep(1.5)
        return super().__call__(arguments, budget_s)


def advantage(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    if batch is not None and len(batch):
        out = Path(HydraConfig.get().runtime.output_dir) / f"trained_rank{w.ctx.rank}.jsonl"
        record = {
            "step": step,
            "group": batch.samples["group"].tolist(),
            "version": batch.samples["version"].tolist(),
        }
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return builtin.compute(w, batch, m, step)
