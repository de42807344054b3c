"""Forward+backward throughput of the Megatron actor: tokens/s (and MFU on GPU).

    python scripts/bench_model.py                 # CPU: small model at TP=1 and TP=2
    python scripts/bench_model.py --size qwen0.5b --tp 1 --dtype bf16   # one GPU
    python scripts/bench_model.py --size moe --tp 1 --ep 1 2   # MoE: EP=1 vs EP=2 (2 ranks)

Each layout runs as its own torchrun job (this file with --worker); for dense sizes a plain
PyTorch reference (the same shapes as a transformers model: forward, backward, grad clip,
torch.optim.AdamW on the same tokens, one process, the same threads) runs beside them, and
every row gets its ratio to it. Each job runs `--repeats` times, the jobs in turns, and
its median run is reported. The driver prints a table last and writes bench_model.csv in
the current directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import report

SIZES = {
    # the embedded task's model (data/tiny.py) at one rank's share of its GRPO batch
    "tiny": dict(vocab=128, hidden=64, inter=128, layers=2, heads=4, kv=2, seq=32, batch=128),
    # a small Llama-style model that a 2-core CPU steps in about a second
    "small": dict(vocab=4096, hidden=256, inter=704, layers=4, heads=8, kv=4, seq=256, batch=4),
    # a small Qwen3-MoE-style model: 8 experts, top-2 (MFU counts active parameters)
    "moe": dict(
        vocab=4096,
        hidden=256,
        inter=704,
        layers=4,
        heads=8,
        kv=4,
        seq=256,
        batch=4,
        experts=8,
        top_k=2,
        moe_inter=256,
    ),
    # Qwen2.5-0.5B's shapes (random weights)
    "qwen0.5b": dict(
        vocab=151936, hidden=896, inter=4864, layers=24, heads=14, kv=2, seq=2048, batch=4
    ),
    # Qwen2.5-7B's widths with 4 of its 28 layers (one GPU: a layer's long-context memory)
    "qwen7b_4layers": dict(
        vocab=152064, hidden=3584, inter=18944, layers=4, heads=28, kv=4, seq=2048, batch=1
    ),
}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12}


def arch_of(size: str, max_positions: int):
    """The HFArch of a SIZES entry, with room for `max_positions` tokens."""
    from distflow_mc.models.hf_config import HFArch, Moe

    s = SIZES[size]
    moe = Moe(s["experts"], s["top_k"], s["moe_inter"], True) if "experts" in s else None
    return HFArch(
        "Qwen2ForCausalLM",
        s["vocab"],
        s["hidden"],
        s["inter"],
        s["layers"],
        s["heads"],
        s["kv"],
        s["hidden"] // s["heads"],
        1e-6,
        1e6,
        max_positions,
        True,
        moe is None,
        qk_norm=moe is not None,
        moe=moe,
    )


def worker(args: argparse.Namespace) -> None:
    import torch

    from distflow_mc.config.schema import OptimConfig, ParallelConfig
    from distflow_mc.models.gpt import build_gpt
    from distflow_mc.models.logprobs import vocab_parallel_logprobs
    from distflow_mc.models.train import TrainableModel
    from distflow_mc.parallel.dist import init_distributed
    from distflow_mc.parallel.megatron_state import init_model_parallel

    s = SIZES[args.size]
    ctx = init_distributed(timeout_s=600)
    mp = init_model_parallel(ParallelConfig(tp=args.tp, ep=args.ep), seed=1)
    arch = arch_of(args.size, s["seq"])
    moe = arch.moe
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = TrainableModel(build_gpt(arch, mp, dtype), OptimConfig(lr=1e-5), total_steps=100)
    n_params = sum(p.numel() for c in model.chunks for p in c.parameters()) * mp.tp
    if moe is not None:  # active parameters: top_k of the experts per token
        expert = 3 * s["hidden"] * moe.intermediate_size
        n_params -= s["layers"] * expert * (moe.num_experts // mp.ep - moe.top_k)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(ctx.device)
    mb = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}

    def loss_fn(mb, out):
        logp, _ = vocab_parallel_logprobs(out, mb["labels"])
        return -logp.sum(), torch.tensor(logp.numel(), dtype=torch.int, device=logp.device), {}

    for _ in range(args.warmup):
        model.step([mb], loss_fn)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        model.step([mb], loss_fn)
    sync()
    elapsed = time.perf_counter() - start
    tokens = s["batch"] * s["seq"] * args.steps * mp.dp
    # 6 N per token for the matmuls, plus causal attention scores and values (fwd+bwd).
    flops_per_token = 6 * n_params + 6 * s["layers"] * s["hidden"] * s["seq"]
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": args.dtype,
        "tp": mp.tp,
        "ep": mp.ep,
        "dp": mp.dp,
        "params_M": round(n_params / 1e6, 1),
        "s_per_step": round(elapsed / args.steps, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "tflops_per_gpu": round(tokens * flops_per_token / elapsed / ctx.world_size / 1e12, 3),
    }
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
    result["mfu"] = round(result["tflops_per_gpu"] * 1e12 / peak, 3) if peak else None
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def reference(args: argparse.Namespace) -> None:
    """The same training step without the framework: transformers' Qwen2 with the worker's
    shapes, next-token log-prob loss, clip 1.0, AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    s = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = Qwen2Config(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=s["seq"],
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)

    def step() -> None:
        optim.zero_grad(set_to_none=True)
        logits = model(ids).logits.float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids.roll(-1, 1)[..., None])
        (-logp.sum() / logp.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": args.dtype,
        "tp": "plain",
        "ep": "-",
        "dp": 1,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "s_per_step": round(elapsed / args.steps, 3),
        "tokens_per_s": round(s["batch"] * s["seq"] * args.steps / elapsed, 1),
        "tflops_per_gpu": None,
        "mfu": None,
    }
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--reference", action="store_true", help="run the plain PyTorch step")
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--ep", type=int, nargs="*", default=[1], help="MoE sizes only")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job, in turns")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker or args.reference:
        args.tp, args.ep = args.tp[0], args.ep[0]
        (reference if args.reference else worker)(args)
        return
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    common = ["--size", args.size, "--dtype", args.dtype, "--steps", str(args.steps)]
    common += ["--warmup", str(args.warmup)]
    jobs = [  # DP = EP: experts split over replicas
        [
            *(torchrun, "--standalone", f"--nproc-per-node={tp * ep}", __file__, "--worker"),
            *(*common, "--tp", str(tp), "--ep", str(ep)),
        ]
        for tp in args.tp
        for ep in args.ep
    ]
    if "experts" not in SIZES[args.size]:
        jobs.append([sys.executable, __file__, "--reference", *common])
    runs: list[list[dict]] = [[] for _ in jobs]
    for _ in range(args.repeats):  # in turns, so the machine's drifting load hits all alike
        for job, out in zip(jobs, runs, strict=True):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [*job, "--out", f.name]
                subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
                out.append(json.loads(Path(f.name).read_text()))
    # each job's median run (by step time)
    rows = [sorted(r, key=lambda x: x["s_per_step"])[len(r) // 2] for r in runs]
    base = rows[-1]["tokens_per_s"] if rows[-1]["tp"] == "plain" else rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_plain" if rows[-1]["tp"] == "plain" else "vs_first"] = round(
            row["tokens_per_s"] / base, 2
        )
    report(rows, "bench_model.csv", width=14)


if __name__ == "__main__":
    main()
