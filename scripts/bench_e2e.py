"""End-to-end speed and learning of an experiment on this machine.

    python scripts/bench_e2e.py                       # cpu_tiny_grpo, 2 ranks, 300 steps
    python scripts/bench_e2e.py --experiment cpu_tiny_ppo --steps 300
    python scripts/bench_e2e.py --experiment cpu_tiny_agent --steps 200 --no-plain

Runs the real entrypoint under torchrun, then prints seconds per step, generated and
total tokens/s (means over steps after the first 10), the reward at the start and end and
our per-stage split; writes bench_e2e_<experiment>.csv (the reward curve) and .png beside
it. For cpu_tiny_grpo the plain single-process loop (plain_grpo.py, the same math, as many
threads as we have ranks x 1) runs in the same invocation right after each of ours
(`--repeats`, 3 by default): the pair with the median ratio is reported, with its
per-stage split beside the plain loop's, and every pair's ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
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
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-loop yardstick")
    parser.add_argument("--repeats", type=int, default=3, help="runs (each with its plain loop)")
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
    plain_cmd = [sys.executable, str(Path(__file__).with_name("plain_grpo.py"))]
    plain_cmd += ["--data", env["DISTFLOW_DATA_DIR"], "--steps", str(args.steps)]
    plain_cmd += ["--threads", str(args.nproc), "--out", str(work / "plain.json")]
    with_plain = args.experiment == "cpu_tiny_grpo" and not args.no_plain

    def avg(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    runs, plains = [], []
    for _ in range(args.repeats):  # ours, then the plain loop: each pair on the same load
        shutil.rmtree(work / "run", ignore_errors=True)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        kept = shutil.copy(work / "run" / "metrics.jsonl", work / f"metrics{len(runs)}.jsonl")
        runs.append([json.loads(x) for x in Path(kept).read_text().splitlines()])
        if with_plain:
            subprocess.run(plain_cmd, check=True)
            plains.append(json.loads((work / "plain.json").read_text()))
    # the median run (by step time) is reported; with the plain loop, the median pair's ratio
    times = [avg("time/step", r[10:] or r) for r in runs]
    if with_plain:
        ratios = [t / p["s_per_step"] for t, p in zip(times, plains, strict=True)]
        pick = sorted(range(len(runs)), key=ratios.__getitem__)[len(runs) // 2]
    else:
        pick = sorted(range(len(runs)), key=times.__getitem__)[len(runs) // 2]
    rows = runs[pick]
    steady = rows[10:] or rows
    stem = f"bench_e2e_{args.experiment}"
    with open(f"{stem}.csv", "w", newline="") as f:
        keys = [
            "step",
            "reward/mean",
            "reward/std",
            "response/length_mean",
            "actor/entropy",
            "agent/tool_call_rate",
            "time/step",
        ]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(work / f"metrics{pick}.jsonl", Path(f"{stem}.png"))

    summary = {
        "run": f"distflow_mc {args.nproc} ranks",
        "s_per_step": round(avg("time/step", steady), 3),
        "total_tokens_per_s": round(avg("throughput/total_tokens_per_s", steady), 1),
        "reward_first10": round(avg("reward/mean", rows[:10]), 3),
        "reward_last50": round(avg("reward/mean", rows[-50:]), 3),
    }
    if "agent/tool_call_rate" in rows[-1]:  # agent rollouts: do they learn to call?
        summary["tool_calls_first10"] = round(avg("agent/tool_call_rate", rows[:10]), 3)
        summary["tool_calls_last50"] = round(avg("agent/tool_call_rate", rows[-50:]), 3)
        summary["turns_last50"] = round(avg("agent/turns", rows[-50:]), 2)
    validated = [r for r in rows if any(k.startswith("val/") for k in r)]
    if validated:
        val = next(k for k in validated[-1] if k.startswith("val/"))
        summary["val_first"] = round(validated[0][val], 3)
        summary["val_last"] = round(validated[-1][val], 3)
    stages = sorted(k for k in rows[-1] if k.startswith("time/") and k != "time/step")
    print("per-stage seconds:", {k[5:]: round(avg(k, steady), 4) for k in stages})
    table = [summary]
    if with_plain:
        plain = plains[pick]
        print("plain loop seconds:", {k: round(v, 4) for k, v in plain.pop("phases").items()})
        print("time vs plain, each pair:", [round(r, 2) for r in ratios])
        table.append(
            {
                "run": f"plain loop, {args.nproc} threads",
                **{k: round(v, 3 if k != "total_tokens_per_s" else 1) for k, v in plain.items()},
            }
        )
        for row in table:
            row["time_vs_plain"] = round(row["s_per_step"] / plain["s_per_step"], 2)
    report(table, f"{stem}_summary.csv", width=18)


if __name__ == "__main__":
    main()
