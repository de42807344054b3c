"""The transformers rollout engine against transformers' own `generate` on the same batch:
the embedded task's prompts x n samples, the same sampling settings and threads. Prints
median seconds per call of both, run in turns, and the ratio (the engine adds its own
log-probs and response bookkeeping, and saves encoding each prompt n times: it prefills a
prompt once for its n samples; `--prompt-words` makes the prompts longer).

    python scripts/bench_rollout.py [--prompts 8 --n 16 --new-tokens 4 --repeats 20]
    python scripts/bench_rollout.py --prompt-words 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench_common import report
from distflow_mc.data.tiny import make_task
from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.rollout.hf_engine import HFEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--prompt-words", type=int, default=0, help="words of context before each prompt"
    )
    args = parser.parse_args()
    root = make_task(Path(tempfile.mkdtemp(prefix="bench_rollout_")))
    model_dir = root / "tiny_llama"
    tok = AutoTokenizer.from_pretrained(model_dir)
    context = " ".join(str(j % 10) for j in range(args.prompt_words))
    prompts = [tok(f"{context} echo: {i % 10}")["input_ids"] for i in range(args.prompts)]
    engine = HFEngine(model_dir, tok.pad_token_id, torch.device("cpu"))
    engine.update_weights([list(load_file(model_dir / "model.safetensors").items())])
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    params = SamplingParams(
        n=args.n,
        temperature=1.0,
        max_new_tokens=args.new_tokens,
        stop_token_ids=(tok.eos_token_id,),
        seed=0,
    )
    rows = [torch.tensor(p) for p in prompts for _ in range(args.n)]
    ids = torch.nn.utils.rnn.pad_sequence(rows, True, tok.pad_token_id, "left")
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], True, 0, "left")

    def ours() -> None:
        engine.generate(prompts, params)

    def theirs() -> None:
        with torch.no_grad():
            plain.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                max_new_tokens=args.new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                top_k=0,  # no top-k (None would mean transformers' default, 50)
                top_p=1.0,
            )

    runs = {"transformers generate": theirs, "HFEngine.generate": ours}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats + 1):  # in turns, so the machine's drift hits both; the
        for name, fn in runs.items():  # first round warms up
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    results = [{"run": k, "s_per_call": statistics.median(v[1:])} for k, v in times.items()]
    for row in results:
        row["vs_generate"] = round(row["s_per_call"] / results[0]["s_per_call"], 2)
        row["s_per_call"] = round(row["s_per_call"], 4)
    report(results, "bench_rollout.csv", width=22)


if __name__ == "__main__":
    main()
