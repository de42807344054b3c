"""Worker for tests/dist/test_placement.py: real GRPO and PPO steps (world size 1, gloo)
under a torch function mode that records every tensor factory called from distflow_mc
without an explicit device.

    python placement_worker.py --out FILE [hydra overrides ...]

On a GPU such a call makes a CPU tensor beside CUDA ones: the placement rule says a stage
makes new tensors on the batch's device, and host-side tensors name device="cpu".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distflow_mc.dag import plan_workflow  # noqa: E402
from distflow_mc.parallel import build_layouts, init_distributed  # noqa: E402
from distflow_mc.stages.inputs import load_inputs  # noqa: E402
from distflow_mc.stages.step import bind, run_step  # noqa: E402
from distflow_mc.stages.validate import validate  # noqa: E402
from distflow_mc.stages.workers import build_workers  # noqa: E402
from tests.conftest import compose_config  # noqa: E402
from tests.dist.factory_devices import FactoryDevices  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args, overrides = parser.parse_known_args()
    from distflow_mc.config import load_config

    ctx = init_distributed(timeout_s=60)
    report = {}
    for experiment in ("cpu_tiny_grpo", "cpu_tiny_ppo"):
        config = load_config(compose_config([f"experiment={experiment}", *overrides]))
        layouts = build_layouts(config, 1)
        plan = plan_workflow(config.algo.workflow)
        inputs = load_inputs(config, layouts, ctx.rank)
        workers = build_workers(config, plan, layouts, ctx, inputs)
        bound = bind(plan, workers)
        mode = FactoryDevices()
        with mode:
            for step in range(2):
                run_step(workers, bound, step).reduce()
            validate(workers, 1)
        workers.close()
        report[experiment] = sorted(mode.missing)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
