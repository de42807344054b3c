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

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distflow_mc.dag import plan_workflow  # noqa: E402
from distflow_mc.parallel import build_layouts, init_distributed  # noqa: E402
from distflow_mc.stages.step import bind, run_step  # noqa: E402
from distflow_mc.stages.validate import validate  # noqa: E402
from distflow_mc.stages.workers import build_workers  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

SRC = str(ROOT / "src" / "distflow_mc")
# torch itself, and the CPU redirect layer that megatron-core's own factory calls pass through
PASS_THROUGH = (str(Path(torch.__file__).parent), f"{SRC}/parallel/cpu_compat.py")
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
}


class FactoryDevices(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.missing: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(PASS_THROUGH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(SRC):
                where = frame.f_code.co_filename.removeprefix(SRC + "/")
                self.missing.add(f"{where}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


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
        workers = build_workers(config, plan, layouts, ctx)
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
