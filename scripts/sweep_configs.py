"""Random configurations through the real entrypoint: each accepted one must run, or stop
with a user error naming a setting; a crash (an unexpected error, or a hang) is a bug.

    python scripts/sweep_configs.py --runs 40 --nproc 2 --seed 0

Draws settings of the embedded tasks (layouts, placement, algorithm, losses, corrections,
micro-batching, recomputation, checkpoints; not virtual pipeline stages: the tiny models
have two layers), keeps the draws the config check and the
planner accept for `--nproc` ranks, runs each for two steps under torchrun, and prints
one line per run: ok, refused (the run's own one-line user error) or CRASH (with its rank
log). Exits 1 when anything crashed (or, below, differed). A rerun with the same seed
draws the same settings.

With `--resume`, each draw runs three steps straight, and two steps, a checkpoint and a
resumed third: the two must log the same metrics (every random draw derives from seed and
step; under SEPARATE with trainer.max_staleness > 0 the steps before the resume only);
DIFFERS names the first metric that does not.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from distflow_mc.config import load_config, register_resolvers, register_schemas
from distflow_mc.dag import plan_workflow
from distflow_mc.models.hf_config import has_vision
from distflow_mc.parallel.layout import build_layouts
from distflow_mc.stages.fields import check_reads
from distflow_mc.stages.inputs import check_vision

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SPACE: dict[str, list] = {
    "experiment": ["cpu_tiny_grpo", "cpu_tiny_ppo", "cpu_tiny_agent", "cpu_tiny_vlm"],
    "parallel.tp": [1, 1, 2],
    "parallel.pp": [1, 1, 2],
    "parallel.cp": [1, 1, 2],
    "parallel.sequence_parallel": [False, True],
    "trainer.actor_optim.distributed_optimizer": [False, True],
    "rollout.tp": [1, 1, 2],
    "rollout.n": [2, 4],
    "data.batch_size": [2, 4],
    "placement": ["colocated", "colocated", "separate"],
    "rollout.stream": [False, True],
    "rollout.stream_chunk": [0, 2],
    "rollout.partial": [False, True],
    "rollout.temperature": [1.0, 0.7],
    "rollout.top_p": [1.0, 0.9],
    "rollout.top_k": [-1, 5],
    "rollout.max_new_tokens": [4, 6],
    "algo.adv_estimator": ["GRPO", "DR_GRPO", "RLOO", "REINFORCE_PP"],
    "algo.policy_loss": ["PPO", "PPO", "GSPO"],
    "algo.loss_agg": ["TOKEN_MEAN", "SEQ_MEAN_TOKEN_SUM", "SEQ_MEAN_TOKEN_MEAN"],
    "algo.kl_coef": [0.0, 0.01],
    "algo.kl_in_reward": [False, True],
    "algo.kl_estimator": ["K1", "K2", "K3"],
    "algo.entropy_coef": [0.0, 0.01],
    "algo.ppo_epochs": [1, 1, 2],
    "algo.mini_batches": [1, 1, 2],
    "algo.dynamic_sampling": [False, False, True],
    "algo.overlong_buffer": [0, 0, 2],
    "algo.tis_cap": ["null", "null", 2.0],
    "algo.mis": ["null", "null", "0.5,2.0"],
    "algo.mis_level": ["TOKEN", "SEQUENCE"],
    "algo.dual_clip": ["null", "null", 3.0],
    "trainer.micro_batch_tokens": [2048, 64, 24],
    "trainer.sequence_packing": [False, True],
    "trainer.shared_prefix": ["AUTO", "NEVER", "ALWAYS"],
    "trainer.recompute": ["NONE", "NONE", "FULL", "SELECTIVE"],
    "trainer.max_staleness": [0, 1, 2],
    "trainer.weight_sync_every": [1, 1, 2],
    "trainer.on_stale": ["WAIT", "DROP"],
    "trainer.save_every": [0, 0, 1],
    "trainer.val_every": [0, 0, 1],
    "trainer.actor_optim.decay_style": ["constant", "linear", "cosine"],
    "trainer.actor_optim.warmup_steps": [0, 1],
}
FIXED = [
    "trainer.progress_bar=false",
    "trainer.tensorboard=false",
    "parallel.timeout_s=60",
]


def draw(rng: random.Random) -> list[str]:
    """One draw as overrides, with the settings that only mean something together drawn
    together (PPO's GAE, the stream's knobs with SEPARATE, both MIS bounds), so that most
    draws are accepted."""
    o = {k: rng.choice(v) for k, v in SPACE.items()}
    if o["experiment"] == "cpu_tiny_ppo":
        o["algo.adv_estimator"] = "GAE"
    if o["placement"] == "separate":
        o["rollout.ranks"] = 1
    else:
        o |= {"rollout.stream": False, "rollout.partial": False, "trainer.weight_sync_every": 1}
    if o["rollout.stream"]:
        o |= {"trainer.max_staleness": 2, "algo.dynamic_sampling": False}
    else:
        o |= {"rollout.stream_chunk": 0, "trainer.on_stale": "WAIT"}
    low, high = ("null", "null") if o["algo.mis"] == "null" else o["algo.mis"].split(",")
    del o["algo.mis"]
    o |= {"algo.mis_low": low, "algo.mis_high": high}
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items()]


def accepted(overrides: list[str], nproc: int) -> bool:
    """Whether the config check, the layouts, the planner and (for a vision-language model)
    what images run with take it (no model needed)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    try:
        config = load_config(cfg)
        build_layouts(config, nproc)
        check_reads(plan_workflow(config.algo.workflow), config)
        if has_vision(config.model.path):
            check_vision(config)
    except ValueError:
        return False
    return True


def run(overrides: list[str], nproc: int, run_dir: Path, timeout: float) -> tuple[str, str]:
    """(ok | refused | CRASH, what it said)."""
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "distflow_mc.main"]
    cmd += [*overrides, f"hydra.run.dir={run_dir}"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "CRASH", f"no end after {timeout:.0f} s (a hang?): {run_dir}"
    if proc.returncode == 0:
        return "ok", ""
    logs = [p.read_text() for p in sorted(run_dir.glob("main_rank*.log"))]
    if not logs or any("stopped by an unexpected error" in log for log in logs):
        return "CRASH", f"see {run_dir}/main_rank*.log"
    errors = [line for line in logs[0].splitlines() if "[ERROR]" in line]
    return "refused", errors[0].split("[ERROR] ", 1)[-1] if errors else proc.stderr[-300:]


def metrics(run_dir: Path) -> list[dict]:
    """A run's records without what the machine's timing sets (times, throughput, idle
    shares) and the validation a run does at its last step."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skip = ("time/", "throughput/", "val/")
    return [
        {k: v for k, v in r.items() if not k.startswith(skip) and not k.endswith("idle_frac")}
        for r in rows
    ]


def resumed(overrides: list[str], nproc: int, run_dir: Path, timeout: float) -> tuple[str, str]:
    """(ok | DIFFERS | refused | CRASH, what it said): three steps straight against two, a
    checkpoint and a resumed third."""
    shutil.rmtree(run_dir, ignore_errors=True)  # (no checkpoint of an earlier sweep)
    base = [o for o in overrides if not o.startswith("trainer.save_every=")]
    # the learning rates' schedules over three steps in both (not over the run's total_steps)
    base += [f"trainer.{m}_optim.decay_steps=3" for m in ("actor", "critic")]
    straight, parts = run_dir / "straight", run_dir / "resumed"
    verdict, said = run([*base, "trainer.total_steps=3"], nproc, straight, timeout)
    for steps in (["trainer.total_steps=2", "trainer.save_every=2"], ["trainer.total_steps=3"]):
        if verdict == "ok":  # (the first finds no checkpoint: it starts afresh)
            verdict, said = run([*base, *steps, "trainer.resume=AUTO"], nproc, parts, timeout)
    if verdict != "ok":
        return verdict, said
    # SEPARATE one or more steps off: the first batch after a resume is generated by the
    # checkpoint's own weights (no older version is kept; README), so from there it differs
    ahead = "placement=separate" in base and "trainer.max_staleness=0" not in base
    got = metrics(parts)
    if [r["step"] for r in got] != [1, 2, 3]:
        return "DIFFERS", f"the resumed run logged steps {[r['step'] for r in got]}"
    for a, b in zip(metrics(straight)[: 2 if ahead else 3], got, strict=False):
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if differ:
            k = differ[0]
            return "DIFFERS", f"step {a['step']}: {k} {a.get(k)} straight, {b.get(k)} resumed"
    return "ok", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="check exact resumes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "sweep_configs")
    args = parser.parse_args()
    register_schemas()
    register_resolvers()
    rng, tally, bad = random.Random(args.seed), {}, 0
    for i in range(args.runs):
        overrides = draw(rng)
        while not accepted(overrides, args.nproc):
            overrides = draw(rng)
        start = time.perf_counter()
        check = resumed if args.resume else run
        steps = [] if args.resume else ["trainer.total_steps=2"]
        verdict, said = check(
            [*overrides, *FIXED, *steps], args.nproc, args.out / f"run{i}", args.timeout
        )
        took = time.perf_counter() - start
        tally[verdict] = tally.get(verdict, 0) + 1
        print(f"{i:3d} {verdict:7s} {took:5.1f} s  {' '.join(overrides)}", flush=True)
        if said:
            print(f"      {said}", flush=True)
        bad += verdict in ("CRASH", "DIFFERS")
    print(json.dumps(tally))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
