"""End-to-end speed and learning of an experiment on this machine.

    python scripts/bench_e2e.py                       # cpu_tiny_grpo, 2 ranks, 300 steps
    python scripts/bench_e2e.py --experiment cpu_tiny_ppo --steps 300

Runs the real entrypoint under torchrun, then prints seconds per step, generated and
total tokens/s (means over steps after the first 10) and the reward at the start and
end; writes bench_e2e_<experiment>.csv (the reward curve) and .png beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import report
from distflow_mc.data.tiny import make_task
from plot_metrics import plot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="cpu_tiny_grpo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    env = {**os.environ, "DISTFLOW_DATA_DIR": str(make_task(work / "data"))}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun,
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "distflow_mc.main",
        f"experiment={args.experiment}",
        f"trainer.total_steps={args.steps}",
        f"hydra.run.dir={work / 'run'}",
        *args.overrides,
    ]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[10:] or rows
    stem = f"bench_e2e_{args.experiment}"
    with open(f"{stem}.csv", "w", newline="") as f:
        keys = [
            "step",
            "reward/mean",
            "reward/std",
            "response/length_mean",
            "actor/entropy",
            "time/step",
        ]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(work / "run" / "metrics.jsonl", Path(f"{stem}.png"))

    def avg(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    summary = {
        "experiment": args.experiment,
        "ranks": args.nproc,
        "steps": args.steps,
        "s_per_step": round(avg("time/step", steady), 3),
        "gen_tokens_per_s": round(avg("throughput/generated_tokens_per_s", steady), 1),
        "total_tokens_per_s": round(avg("throughput/total_tokens_per_s", steady), 1),
        "reward_first10": round(avg("reward/mean", rows[:10]), 3),
        "reward_last50": round(avg("reward/mean", rows[-50:]), 3),
    }
    report([summary], f"{stem}_summary.csv", width=18)


if __name__ == "__main__":
    main()
