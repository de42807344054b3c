"""A plain single-process PyTorch GRPO loop for the embedded task: the yardstick for
bench_e2e.py (benchmark reference, not library code). The same math as
`experiment=cpu_tiny_grpo`: 16 prompts x 16 samples of at most 4 new tokens at T=1, the
embedded task's reward, GRPO advantages (group mean/std), the clipped token-mean policy loss
on-policy, a k3 KL term (0.001) to the frozen initial model, grad clip 1.0, Adam(W) with
lr 3e-3 and no weight decay.

    python scripts/plain_grpo.py --data DIR --steps 300 --threads 2 --out result.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distflow_mc.rewards.tiny_copy import score

PROMPTS, N, NEW_TOKENS, LR, KL, CLIP = 16, 16, 4, 3e-3, 1e-3, 0.2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(args.data / "tiny_llama")
    model = AutoModelForCausalLM.from_pretrained(args.data / "tiny_llama", dtype=torch.float32)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    optim = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rows = pq.read_table(args.data / "tiny_task" / "train.parquet").to_pylist()
    order = torch.randperm(len(rows)).tolist()
    times, rewards, tokens = [], [], []
    phases: dict[str, list[float]] = {"rollout": [], "reward": [], "ref": [], "train": []}
    last = [0.0]

    def lap(phase: str) -> None:  # the seconds since the last lap go to `phase`
        now = time.perf_counter()
        phases[phase].append(now - last[0])
        last[0] = now

    for step in range(args.steps):
        start = last[0] = time.perf_counter()
        batch = [rows[order[(step * PROMPTS + i) % len(rows)]] for i in range(PROMPTS)]
        texts = [
            tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for r in batch
        ]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts for _ in range(N)]
        width = max(map(len, ids))
        left = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = torch.arange(width)[None] >= torch.tensor([width - len(x) for x in ids])[:, None]
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=left,
                attention_mask=mask.long(),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,  # no top-k (None means transformers' default, 50)
                max_new_tokens=NEW_TOKENS,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, width:]
        lap("rollout")
        stop = (new == tok.eos_token_id).int().cumsum(1)
        resp_mask = ((stop == 0) | ((stop == 1) & (new == tok.eos_token_id))).float()
        texts = [
            tok.decode(r[m.bool()], skip_special_tokens=True)
            for r, m in zip(new, resp_mask, strict=True)
        ]
        truths = [r["reward_model"]["ground_truth"] for r in batch for _ in range(N)]
        reward = torch.tensor([score(t, g, {}) for t, g in zip(texts, truths, strict=True)])
        grouped = reward.view(PROMPTS, N)
        adv = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
        adv = adv.reshape(-1, 1)
        full_mask = torch.cat([mask.float(), resp_mask], 1)
        lap("reward")
        with torch.no_grad():
            ref_logits = ref(out, attention_mask=full_mask.long()).logits[:, width - 1 : -1]
            ref_logp = torch.log_softmax(ref_logits.float(), -1).gather(-1, new[..., None])
        lap("ref")
        model.train()
        logits = model(out, attention_mask=full_mask.long()).logits[:, width - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
        log_r = logp - ref_logp.squeeze(-1)
        kl = torch.exp(-log_r) - 1 + log_r
        count = resp_mask.sum()
        loss = ((pg + KL * kl) * resp_mask).sum() / count
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        lap("train")
        times.append(time.perf_counter() - start)
        rewards.append(float(reward.mean()))
        tokens.append(float(full_mask.sum()))
    steady = slice(10, None) if args.steps > 10 else slice(None)
    s_per_step = sum(times[steady]) / len(times[steady])
    args.out.write_text(
        json.dumps(
            {
                "s_per_step": s_per_step,
                "total_tokens_per_s": sum(tokens[steady]) / sum(times[steady]),
                "reward_first10": sum(rewards[:10]) / len(rewards[:10]),
                "reward_last50": sum(rewards[-50:]) / len(rewards[-50:]),
                "phases": {k: sum(v[steady]) / len(v[steady]) for k, v in phases.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
