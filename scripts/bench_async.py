"""Colocated against asynchronous (rollout.placement=SEPARATE) RL on this machine.

    python scripts/bench_async.py                      # both tasks, 2 ranks, 60 steps, 2 turns
    python scripts/bench_async.py --tasks agent_slow --steps 100 --repeats 3
    python scripts/bench_async.py --separate-nproc 3 --rollout-ranks 2   # 2 generate, 1 trains
    python scripts/bench_async.py --tasks agent_slow --modes COLOCATED "SEPARATE k=2 stream"
    python scripts/bench_async.py --tasks grpo_long --modes COLOCATED "SEPARATE k=2" \
        "SEPARATE k=2 stream" --chunk 8

Per task, the same run as COLOCATED (every rank generates, then trains) and as SEPARATE with
trainer.max_staleness k = 0, 1, 2 (the last rank generates, the others train; k > 0 with
algo.tis_cap=2, the placement=separate preset), and k = 2 with rollout.stream (single-turn
tasks in pieces of `--chunk` tokens, rollout.stream_chunk), on the same ranks, in turns
(`--repeats` rounds of all of them, so a slow minute of a noisy machine hits them alike).
Tasks: `grpo` is the embedded GRPO task (compute-bound: on 2 shared cores the groups split
the cores they had together); `grpo_long` the same with room for 48-token responses (the
untrained model's run to the limit, the trained one's stop after a digit: long and short
responses in the same batch, the straggler that streaming in pieces is for);
`agent_slow` is the embedded agent task whose tool answers after 50-200 ms (data/tiny.py
SlowLookup), the slow environment asynchronous RL exists for.

Prints per run (medians over the rounds; means over the steps after the first 5): seconds per
step, generated tokens/s and the ratio to the first mode (COLOCATED by default), each
group's idle fraction, the staleness, and the reward over the first and last 10 steps;
writes bench_async.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import report
from distflow_mc.data.tiny import make_task

TASKS = {
    "grpo": ["experiment=cpu_tiny_grpo"],
    "grpo_long": ["experiment=cpu_tiny_grpo", "rollout.max_new_tokens=48"],
    "agent_slow": [
        "experiment=cpu_tiny_agent",
        "rollout.agent.tools=[distflow_mc.data.tiny.SlowLookup]",
    ],
}
STREAM = "rollout.stream=true"
MODES = {
    "COLOCATED": [],
    "SEPARATE k=0": ["placement=separate", "trainer.max_staleness=0", "algo.tis_cap=null"],
    "SEPARATE k=1": ["placement=separate", "trainer.max_staleness=1"],
    "SEPARATE k=2": ["placement=separate", "trainer.max_staleness=2"],
    # groups waiting for a tool, or still generating, go on while others generate; the
    # rollout runs k - 1 ahead (k=3: as far as k=2 without the stream)
    "SEPARATE k=2 stream": ["placement=separate", "trainer.max_staleness=2", STREAM],
    "SEPARATE k=3 stream": ["placement=separate", "trainer.max_staleness=3", STREAM],
}
WARMUP = 5


def run(nproc: int, overrides: list[str], work: Path, env: dict) -> list[dict]:
    out = Path(tempfile.mkdtemp(dir=work))
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "distflow_mc.main",
        *overrides,
        f"hydra.run.dir={out}",
        "trainer.progress_bar=false",
        "trainer.val_every=0",
        "trainer.tensorboard=false",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict]) -> dict[str, float]:
    steady = rows[WARMUP:]

    def mean(key: str, of: list[dict] = steady) -> float:
        return statistics.fmean(r.get(key, 0.0) for r in of)

    seconds = mean("time/step")
    return {
        "s_per_step": seconds,
        "gen_tok_per_s": mean("rollout/generated_tokens") / seconds,
        "rollout_idle": mean("rollout/idle_frac"),
        "train_idle": mean("train/idle_frac"),
        "staleness": mean("staleness/mean"),
        "reward_first10": mean("reward/mean", rows[:10]),
        "reward_last10": mean("reward/mean", rows[-10:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["grpo", "agent_slow"], choices=list(TASKS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--separate-nproc", type=int, help="ranks of the SEPARATE runs (default: --nproc)"
    )
    parser.add_argument("--rollout-ranks", type=int, default=1, help="of the SEPARATE runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--chunk", type=int, default=8, help="rollout.stream_chunk of single-turn streams"
    )
    parser.add_argument("--csv", default="bench_async.csv")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_async_"))
    env = {**os.environ, "DISTFLOW_DATA_DIR": str(make_task(work / "data"))}
    rows = []
    for task in args.tasks:
        chunk = [] if task.startswith("agent") else [f"rollout.stream_chunk={args.chunk}"]
        modes = {m: x + chunk * (STREAM in x) for m, x in MODES.items() if m in args.modes}
        got: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, extra in modes.items():
                overrides = [*TASKS[task], f"trainer.total_steps={args.steps}", *extra]
                nproc = args.nproc
                if extra:
                    overrides.append(f"rollout.ranks={args.rollout_ranks}")
                    nproc = args.separate_nproc or args.nproc
                got[mode].append(summary(run(nproc, overrides, work, env)))
                print(task, mode, got[mode][-1], flush=True)
        base = statistics.median(s["gen_tok_per_s"] for s in got[next(iter(modes))])
        for mode, runs in got.items():
            med = {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            rows.append(
                {
                    "task": task,
                    "run": mode,
                    "s/step": f"{med['s_per_step']:.3f}",
                    "gen tok/s": f"{med['gen_tok_per_s']:.0f}",
                    "vs first": f"{med['gen_tok_per_s'] / base:.2f}x",
                    "rollout idle": f"{med['rollout_idle']:.2f}",
                    "train idle": f"{med['train_idle']:.2f}",
                    "staleness": f"{med['staleness']:.2f}",
                    "reward first10": f"{med['reward_first10']:.3f}",
                    "reward last10": f"{med['reward_last10']:.3f}",
                }
            )
    report(rows, args.csv, width=14)


if __name__ == "__main__":
    main()
