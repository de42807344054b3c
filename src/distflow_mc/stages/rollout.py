"""ROLLOUT and REWARD nodes: generate on the rollout layout's emitters, score locally."""

from __future__ import annotations

import torch
import torch.distributed as dist

from distflow_mc.agent.loop import Trajectory, row_tools
from distflow_mc.algos.dapo import informative_groups, overlong_penalty
from distflow_mc.data.batch import Batch
from distflow_mc.data.loader import PromptBatch
from distflow_mc.models.vision import sample_positions
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.engine import Generation, SamplingParams
from distflow_mc.rollout.hf_engine import Interrupt
from distflow_mc.stages.workers import Workers


def generate(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    """n samples per prompt of this rank's share, as prompt+response sequences with a
    response mask and the engine's log-probs (token-aligned, 0 on prompt tokens).

    With `algo.dynamic_sampling` (DAPO), groups whose rewards are all equal are dropped
    and more prompts are drawn until every rank has its share of groups, at most
    `algo.dynamic_sampling_max_rounds` times. Every rank's loader advances in every
    round (the loader state stays one global position), and all ranks agree on another
    round with one all-reduce. With rollout.stream, the rank's stream gives the groups."""
    if w.stream is not None:
        return streamed(w, m, step)
    a = w.config.algo
    target = w.config.data.batch_size // w.layouts.rollout.dp
    pieces: list[Batch] = []
    have = 0
    for round_ in range(a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1):
        if w.is_rollout_emitter:
            prompts = w.loader.next()
            if have < target:
                got = _sample(w, prompts, m, step, round_)
                if a.dynamic_sampling:
                    got = score(w, got, m)
                    keep = informative_groups(got.samples["reward"], got.samples["group"])
                    got = got.select(keep.nonzero().squeeze(1).tolist())
                pieces.append(got)
                have += len(got) // w.config.rollout.n
        if not a.dynamic_sampling:
            break
        short = torch.tensor([float(w.is_rollout_emitter and have < target)], device="cpu")
        dist.all_reduce(short, group=w.rollout_group)
        m.set("rollout/dynamic_rounds", round_ + 1)
        if not short.item():
            break
    if not w.is_rollout_emitter:
        return None
    batch = Batch.concat(pieces)
    keep_samples = min(len(batch), target * w.config.rollout.n)
    m.add("rollout/groups", keep_samples // w.config.rollout.n)
    m.add_total("rollout/samples", keep_samples)
    return batch if keep_samples == len(batch) else batch.select(list(range(keep_samples)))


def streamed(w: Workers, m: Metrics, step: int) -> Batch:
    """rollout.stream: this step's prompts into the stream, its share of finished groups
    out (agent trajectories, or single turns without tools), each sample with the version
    that started it and each token with the one that drew it."""
    quota = w.config.data.batch_size // w.layouts.rollout.dp
    # one share more in flight than a step takes: a share's worth of groups to generate
    # while others wait for tools (two draws at the start, and after groups were dropped)
    draws = [w.loader.next() for _ in range(1 + (len(w.stream.groups) < quota))]
    for got in draws:
        m.add_total("data/malformed_rows", got.malformed)
        m.add_total("data/overlong_prompts", got.overlong)
    prompts = Batch.concat([got.batch for got in draws])
    extras = prompts.objects["extra"]
    offered = [w.agent.offered(row_tools(e)) if w.agent else {} for e in extras]
    params = _params(w, step, 0)
    done, prompts = w.stream.take(prompts, offered, params, step, quota, m)
    batch = _agent_batch(done, prompts, params.n, w.ctx.device)
    if w.agent is not None:
        _agent_metrics(done, m)
    else:  # single turns: the reward reads the response, as without the stream
        del batch.objects["trajectory"]
    batch.tokens["token_version"], batch.samples["version"] = _versions(done, w.ctx.device)
    m.add("rollout/groups", len(prompts))
    m.add_total("rollout/samples", len(batch))
    return batch


def _versions(done: list[Trajectory], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the weight version that drew it (prompt and tool tokens: the turn's
    before them; rollout.partial: the count of updates before it); per sample, the version
    of its first turn."""
    versions, lengths = [], []
    for t in done:
        ends = [start for start, _ in t.versions[1:]] + [len(t.ids)]
        versions += [v for _, v in t.versions]
        lengths += [end - start for end, start in zip(ends, [0, *ends[:-1]], strict=True)]
    per_token = torch.tensor(versions, dtype=torch.int64, device=device).repeat_interleave(
        torch.tensor(lengths, dtype=torch.int64, device=device)
    )
    first = [t.versions[0][1] for t in done]
    return per_token, torch.tensor(first, dtype=torch.int64, device=device)


def _params(w: Workers, step: int, round_: int) -> SamplingParams:
    r = w.config.rollout
    return SamplingParams(
        n=r.n,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=(w.tokenizer.eos_token_id,),
        seed=((w.config.trainer.seed * 1_000_003 + step) * 17 + round_) * 4099 + w.rollout_rank,
    )


def _sample(w: Workers, got: PromptBatch, m: Metrics, step: int, round_: int) -> Batch:
    m.add_total("data/malformed_rows", got.malformed)
    m.add_total("data/overlong_prompts", got.overlong)
    return rollouts(w, got.batch, _params(w, step, round_), m, w.interrupt)


TOKEN_FIELDS = {
    "input_ids": torch.int64,
    "response_mask": torch.float32,
    "rollout_logprobs": torch.float32,
}
PROMPT_OBJECTS = ("data_source", "ground_truth", "extra_info", "extra")  # from the loader


def _carried(prompts: Batch) -> tuple[str, ...]:
    """The prompts' objects every sample keeps: the loader's, and a vision-language
    model's images (data/images.py)."""
    return (*PROMPT_OBJECTS, *(("images",) if "images" in prompts.objects else ()))


def rollouts(
    w: Workers,
    prompts: Batch,
    params: SamplingParams,
    m: Metrics | None = None,
    interrupt: Interrupt | None = None,
) -> Batch:
    """`params.n` samples per prompt: single completions, or agent trajectories when
    `rollout.agent.tools` is set (then `m` gets the agent metrics). With `interrupt`
    (rollout.partial), weights may change during the generation: each token's count of
    updates before it goes in the `weight_updates` token field."""
    host = [prompts.token_slice("input_ids", i) for i in range(len(prompts))]
    if w.agent is None:
        extra = {"interrupt": interrupt} if interrupt is not None else {}
        if "images" in prompts.objects:  # a vision-language model's prompts
            extra["images"] = prompts.objects["images"]
        gen = w.engine.generate([p.tolist() for p in host], params, **extra)
        batch = _to_batch(gen, host, prompts, params.n, w.ctx.device)
        if w.config.rollout.partial:
            batch.tokens["weight_updates"] = _updates(gen, batch)
        if "images" in batch.objects:
            batch.tokens["mrope_positions"], batch.tokens["image_mask"] = positions(w, batch)
        return batch
    extras = prompts.objects["extra"]
    offered = [w.agent.offered(row_tools(e)) for e in extras]
    images = prompts.objects.get("images")
    done = w.agent.run(w.engine, [p.tolist() for p in host], offered, params, interrupt, images)
    if m is not None:
        _agent_metrics(done, m)
    batch = _agent_batch(done, prompts, params.n, w.ctx.device)
    if interrupt is not None:  # each token's count of updates before it
        batch.tokens["weight_updates"] = _versions(done, w.ctx.device)[0]
    if images is not None:
        batch.tokens["mrope_positions"], batch.tokens["image_mask"] = positions(w, batch)
    return batch


def _to_batch(
    gen: Generation, prompt_ids: list[torch.Tensor], prompts: Batch, n: int, device: torch.device
) -> Batch:
    """prompt + response sequences with a response mask and the engine's log-probs
    (token-aligned, 0 on prompt tokens), on `device` (the engine's output stays there).
    Packed with one concatenation per field, not one per sample."""
    if not gen.response_ids:
        return _empty(device, prompts, "finish_reason")
    ids = [p.to(device) for p in prompt_ids]
    pieces = [
        x
        for p, r in zip(gen.prompt_index, gen.response_ids, strict=True)
        for x in (ids[p], r.to(device))  # SGLang's responses are on the host
    ]
    input_ids = torch.cat(pieces)
    parts = torch.tensor([len(x) for x in pieces], dtype=torch.int64, device=device)
    is_response = torch.arange(len(pieces), device=device) % 2
    response_mask = torch.repeat_interleave(is_response, parts, output_size=len(input_ids))
    logprobs = torch.zeros(len(input_ids), device=device)
    logprobs[response_mask.bool()] = torch.cat([lp.to(device) for lp in gen.logprobs]).float()
    tokens = {
        "input_ids": input_ids,
        "response_mask": response_mask.float(),
        "rollout_logprobs": logprobs,
    }
    lengths = parts.view(-1, 2).sum(1)
    return _with_samples(tokens, lengths, gen.prompt_index, gen.finish_reasons, prompts, n)


def _updates(gen: Generation, batch: Batch) -> torch.Tensor:
    """Per token, how many weight updates came before it in its generation (0 on prompt
    tokens and wherever no update crossed)."""
    mask = batch.tokens["response_mask"]
    dev = mask.device
    out = torch.zeros(len(mask), dtype=torch.int64, device=dev)
    if gen.segments:
        counts = torch.tensor(gen.segments, dtype=torch.int64, device=dev)  # [samples, parts]
        updates = torch.arange(counts.shape[1], device=dev).repeat(len(counts))
        out[mask.bool()] = updates.repeat_interleave(counts.reshape(-1))
    return out


def _agent_batch(done: list[Trajectory], prompts: Batch, n: int, device: torch.device) -> Batch:
    """Trajectories as they were built: ids, generated-token mask, engine log-probs."""
    if not done:
        return _empty(device, prompts, "finish_reason", "trajectory")
    flat = {k: [x for t in done for x in getattr(t, k)] for k in ("ids", "mask", "logprobs")}
    tokens = {
        "input_ids": torch.tensor(flat["ids"], dtype=torch.int64, device=device),
        "response_mask": torch.tensor(flat["mask"], device=device),
        "rollout_logprobs": torch.tensor(flat["logprobs"], device=device),
    }
    lengths = torch.tensor([len(t.ids) for t in done], device=device)
    index, finish = [t.prompt for t in done], [t.finish for t in done]
    batch = _with_samples(tokens, lengths, index, finish, prompts, n)
    batch.objects["trajectory"] = [t.summary() for t in done]
    return batch


def _empty(device: torch.device, prompts: Batch, *objects: str) -> Batch:
    """No samples, with every field a rollout's batch has."""
    batch = Batch.empty(TOKEN_FIELDS, (*_carried(prompts), *objects), device)
    batch.samples["prompt_length"] = torch.empty(0, dtype=torch.int64, device=device)
    return batch


def _with_samples(
    tokens: dict[str, torch.Tensor],
    lengths: torch.Tensor,
    prompt_index: list[int],
    finish_reasons: list[str],
    prompts: Batch,
    n: int,
) -> Batch:
    """The packed sequences (of `lengths`) with uid (prompt uid * n + sample), group (the
    prompt), the prompt's length and objects."""
    device = lengths.device
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=device)
    offsets[1:] = lengths.cumsum(0)
    index = torch.tensor(prompt_index, dtype=torch.int64, device=device)
    prompt_uid = prompts.samples["uid"].to(device)[index]
    sample = torch.arange(len(index), device=device) % n
    objects = {k: [prompts.objects[k][p] for p in prompt_index] for k in _carried(prompts)}
    objects["finish_reason"] = finish_reasons
    samples = {"uid": prompt_uid * n + sample, "group": prompt_uid}
    samples["prompt_length"] = prompts.lengths.to(device)[index]  # every sample begins so
    return Batch(offsets, tokens, samples, objects)


def positions(w: Workers, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A vision-language model's samples: each token's three positions (time, height,
    width; [tokens, 3]) and whether it is one of its prompt's images' (models/vision.py),
    counted on the host (a loop over runs of tokens), then on the batch's device."""
    vision = w.arch.vision
    none = torch.zeros(0, 3, dtype=torch.int64, device="cpu")
    prompt = batch.samples["prompt_length"].tolist()
    parts = [
        sample_positions(
            batch.token_slice("input_ids", i).cpu(),
            prompt[i],
            images.grid_thw.cpu() if images is not None else none,
            vision.image_token_id,
            vision.merge,
        )
        for i, images in enumerate(batch.objects["images"])
    ]
    device = batch.offsets.device
    if not parts:
        return torch.empty(0, 3, dtype=torch.int64, device=device), torch.empty(
            0, dtype=torch.bool, device=device
        )
    return torch.cat([p for p, _ in parts]).to(device), torch.cat([m for _, m in parts]).to(device)


def _agent_metrics(done: list[Trajectory], m: Metrics) -> None:
    k = len(done)
    m.add("agent/turns", sum(t.turns for t in done), k)
    m.add("agent/tool_calls", sum(t.tool_calls for t in done), k)
    m.add("agent/tool_call_rate", sum(t.tool_calls > 0 for t in done), k)
    m.add("agent/tool_errors", sum(t.tool_errors for t in done), k)
    m.add("agent/tool_timeouts", sum(t.tool_timeouts for t in done), k)
    m.add("agent/truncated_frac", sum(t.finish != "stop" for t in done), k)


def responses(w: Workers, batch: Batch) -> list[str]:
    """What the reward judges: the response text, or an agent's last turn (strings live on
    the host)."""
    if "trajectory" in batch.objects:
        return [t["messages"][-1]["content"] for t in batch.objects["trajectory"]]
    mask = batch.tokens["response_mask"].bool()
    counts = torch.bincount(batch.token_owner()[mask], minlength=len(batch)).tolist()
    pieces = [p.tolist() for p in batch.tokens["input_ids"][mask].cpu().split(counts)]
    # (transformers takes an empty list for one empty sequence)
    return w.tokenizer.batch_decode(pieces, skip_special_tokens=True) if pieces else []


def infos(batch: Batch) -> list[dict]:
    """extra_info per sample; an agent's trajectory (messages, tool calls and results,
    turns) rides along as extra_info["trajectory"]."""
    o = batch.objects
    if "trajectory" not in o:
        return o["extra_info"]
    return [{**i, "trajectory": t} for i, t in zip(o["extra_info"], o["trajectory"], strict=True)]


def score(w: Workers, batch: Batch, m: Metrics) -> Batch:
    """Rewards (plus DAPO's overlong penalty when configured) into samples["reward"]."""
    a = w.config.algo
    o = batch.objects
    scores = w.rewards(responses(w, batch), o["data_source"], o["ground_truth"], infos(batch))
    mask = batch.tokens["response_mask"]
    rewards = torch.tensor(scores.rewards, dtype=torch.float32, device=mask.device)
    lengths = mask.new_zeros(len(batch)).index_add_(0, batch.token_owner(), mask)
    if a.overlong_buffer:
        max_len = w.config.rollout.max_new_tokens
        rewards = rewards + overlong_penalty(
            lengths, max_len, a.overlong_buffer, a.overlong_penalty
        )
    batch.samples["reward"] = rewards
    m.add("reward/mean", float(rewards.sum()), len(rewards))
    m.add("reward/sq", float((rewards**2).sum()), len(rewards))
    m.add_total("reward/samples", len(rewards))
    m.add_total("reward/errors", scores.errors)
    m.add_total("reward/timeouts", scores.timeouts)
    m.add("response/length_mean", float(lengths.sum()), len(lengths))
    m.add("response/clipped_frac", sum(f == "length" for f in o["finish_reason"]), len(batch))
    m.add_total("rollout/generated_tokens", float(lengths.sum()))
    m.add_total("rollout/total_tokens", float(batch.num_tokens))
    return batch


def reward(w: Workers, batch: Batch | None, m: Metrics, step: int) -> Batch | None:
    """The REWARD node; with dynamic sampling the rollout has scored already."""
    if batch is None or "reward" in batch.samples:
        return batch
    return score(w, batch, m)
