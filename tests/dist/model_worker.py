"""Worker for tests/dist/test_models.py, run under torchrun (or plain python for one rank).

    model_worker.py --tp T --pp P --models DIR --out DIR
    model_worker.py --jobs FILE    (a JSON list of such argument lists, run in turn)

Checks against transformers on tiny Llama and Qwen2 models (padded rows, and packed rows
against each sequence's own forward), writes per-rank JSON results;
the test asserts on them. All collectives run under the default group's short timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distflow_mc import checkpoint
from distflow_mc.config.schema import OptimConfig, ParallelConfig
from distflow_mc.data.batch import Batch
from distflow_mc.data.chunks import cut, local_heads, split
from distflow_mc.data.microbatch import Item, packed_microbatch
from distflow_mc.models.convert import export_hf
from distflow_mc.models.factory import load_model, load_reference
from distflow_mc.models.hf_config import read_hf_config
from distflow_mc.models.logprobs import vocab_parallel_logprobs
from distflow_mc.models.schedule import run_microbatches
from distflow_mc.models.train import TrainableModel
from distflow_mc.models.vision import mrope_positions
from distflow_mc.parallel.dist import init_distributed
from distflow_mc.parallel.megatron_state import init_model_parallel, world_of
from distflow_mc.rollout.hf_engine import HFEngine
from distflow_mc.rollout.weight_stream import stream_buckets
from distflow_mc.rollout.weight_sync import sync_weights_to_group
from tests.chunks_ref import held
from tests.tiny_hf import IMAGE_TOKEN, load_hf, load_tensors

TEMPERATURE = 0.7


def batches(seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of different lengths (variable sequence lengths)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, s in ((2, 12), (2, 7)):
        ids = torch.randint(0, 128, (b, s), generator=g)
        mask = torch.ones(b, s)
        mask[:, -1] = 0  # the last token has no label
        out.append({"input_ids": ids, "labels": ids.roll(-1, dims=1), "loss_mask": mask})
    return out


def packed_batch(seed: int = 4) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Three sequences of 5, 6 and 7 tokens packed in two rows (5 + 6, then 7): spans, each
    token's position in its sequence (data/microbatch.py's packed layout); and the
    sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in (5, 6, 7)]
    ids = torch.arange(3)
    batch = Batch.from_sequences({"input_ids": seqs}, {"uid": ids, "group": ids})
    mb, _ = packed_microbatch(batch, [[Item((0,)), Item((1,))], [Item((2,))]])
    keys = ("input_ids", "attention_mask", "positions", "spans", "prefixes")
    mb = {k: mb[k] for k in keys}
    return mb | {"labels": mb["input_ids"].roll(-1, dims=1)}, seqs


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    if mpu.get_tensor_model_parallel_world_size() == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def cp_cases(seed: int = 6) -> list[tuple[Batch, list[list[Item]]]]:
    """Batches and their micro-batch rows for context parallelism: rows of 12 tokens whose
    prompts (5 and 9 tokens) are a segment of their own; rows of 7 tokens (not a multiple
    of 2 x CP) without prompts; sequences of 5 and 6 tokens packed in one row, of 7 in the
    other; and a group of three sharing a 6-token prompt in one row (trainer.shared_prefix).
    Items without their prompt parts' sizes: `cp_rows` adds them."""
    g = torch.Generator().manual_seed(seed)

    def batch(lengths, prompts=None, prefix=0):
        common = torch.randint(0, 100, (prefix,), generator=g)
        seqs = [
            torch.cat([common, torch.randint(0, 100, (n - prefix,), generator=g)]) for n in lengths
        ]
        ids = torch.arange(len(lengths))
        samples = {"uid": ids, "group": ids * 0}
        if prompts is not None:
            samples["prompt_length"] = torch.tensor(prompts)
        return Batch.from_sequences({"input_ids": seqs}, samples)

    return [
        (batch([12, 12], [5, 9]), [[Item((0,))], [Item((1,))]]),
        (batch([7, 7]), [[Item((0,))], [Item((1,))]]),
        (batch([5, 6, 7], [2, 3, 1]), [[Item((0,)), Item((1,))], [Item((2,))]]),
        (batch([9, 11, 8], [6, 6, 6], prefix=6), [[Item((0, 1, 2))]]),
    ]


def cp_equivalence(chunks, model_dir: Path, mp, fn) -> dict:
    """Each CP rank's chunks of `cp_cases` (data/chunks.py's cut, the trainer's rows): the
    outputs at every real token it holds against transformers' forward of its sample."""
    size, rank = mp.cp, mpu.get_context_parallel_rank()
    cases, mbs, places = cp_cases(), [], []
    for batch, rows in cases:
        mine = cut(batch, size, rank)
        heads = local_heads(mine, size)
        rows = [[Item(i.samples, heads[i.samples[0]]) for i in row] for row in rows]
        mb, where = packed_microbatch(mine, rows, 0, spans=True)
        mbs.append(mb)
        places.append(where)
    outputs = run_microbatches(chunks, mbs, fn, forward_only=True)
    if not mpu.is_pipeline_last_stage():
        return {}
    hf = load_hf(model_dir)
    diffs = {"logits": 0.0, "logp": 0.0, "entropy": 0.0}
    for (batch, _), out, where in zip(cases, outputs, places, strict=True):
        flat = out.flatten(0, 1)[where]  # the rank's tokens, sample after sample
        at = 0
        for i, (n, a) in enumerate(zip(batch.lengths.tolist(), split(batch).tolist(), strict=True)):
            seq = batch.token_slice("input_ids", i)
            with torch.no_grad():
                ref = hf(seq[None]).logits[0]
            positions, real = (torch.tensor(x) for x in zip(*held(n, a, size, rank), strict=True))
            mine = flat[at : at + len(positions)]
            at += len(positions)
            keep = real & (positions + 1 < n)  # (the last token predicts none)
            pos = positions[keep]
            ref_lsm = torch.log_softmax(ref[pos] / TEMPERATURE, dim=-1)
            ref_logp = ref_lsm.gather(-1, seq[pos + 1, None])[:, 0]
            ref_ent = -(ref_lsm.exp() * ref_lsm).sum(-1)
            got = mine[keep]
            logits, logp, ent = got[:, : ref.shape[-1]], got[:, -2], got[:, -1]
            diffs["logits"] = max(diffs["logits"], (logits - ref[pos]).abs().max().item())
            diffs["logp"] = max(diffs["logp"], (logp - ref_logp).abs().max().item())
            diffs["entropy"] = max(diffs["entropy"], (ent - ref_ent).abs().max().item())
    return diffs


def equivalence(kind: str, model_dir: Path, mp) -> dict:
    arch, chunks = load_reference(model_dir, mp, torch.float32)
    assert not any(p.requires_grad for c in chunks for p in c.parameters())

    def fn(mb, out):  # one tensor
        logp, ent = vocab_parallel_logprobs(
            out, mb["labels"], TEMPERATURE, with_entropy=True, vocab_size=arch.vocab_size
        )
        return torch.cat([gather_vocab(out), logp[..., None], ent[..., None]], dim=-1)

    result = {}
    if mp.cp > 1:
        diffs = cp_equivalence(chunks, model_dir, mp, fn)
        result.update({f"{kind}_{k}_maxdiff": v for k, v in diffs.items()})
    else:
        packed, seqs = packed_batch()
        mbs = [*batches(), packed]
        outputs = run_microbatches(chunks, mbs, fn, forward_only=True)
    if mp.cp == 1 and mpu.is_pipeline_last_stage():
        hf = load_hf(model_dir)
        with torch.no_grad():
            refs = [hf(mb["input_ids"]).logits for mb in batches()]
            # the packed rows: each sequence on its own, placed where the rows hold it
            one = [hf(seq[None]).logits[0] for seq in seqs]
        b, s = packed["input_ids"].shape
        ref = one[0].new_zeros(b, s, one[0].shape[-1])
        ref[0, :5], ref[0, 5:11], ref[1, :7] = one
        refs.append(ref)
        diffs = {"logits": 0.0, "logp": 0.0, "entropy": 0.0}
        for mb, out, ref in zip(mbs, outputs, refs, strict=True):
            real = mb.get("attention_mask", torch.ones(mb["input_ids"].shape)).bool()
            s = real.shape[1]  # virtual stages pad micro-batches
            # virtual stages pad the sequence, TP the vocabulary (to a multiple of TP)
            logits, logp, ent = out[:, :s, : ref.shape[-1]], out[:, :s, -2], out[:, :s, -1]
            ref_lsm = torch.log_softmax(ref / TEMPERATURE, dim=-1)
            ref_logp = ref_lsm.gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
            ref_ent = -(ref_lsm.exp() * ref_lsm).sum(-1)
            diffs["logits"] = max(diffs["logits"], (logits - ref)[real].abs().max().item())
            diffs["logp"] = max(diffs["logp"], (logp - ref_logp)[real].abs().max().item())
            diffs["entropy"] = max(diffs["entropy"], (ent - ref_ent)[real].abs().max().item())
        result.update({f"{kind}_{k}_maxdiff": v for k, v in diffs.items()})
    exported = {}
    for bucket in export_hf(chunks, arch, mp, bucket_bytes=16 << 10):
        assert sum(t.numel() * t.element_size() for _, t in bucket) <= 16 << 10 or len(bucket) == 1
        exported.update({n: t.clone() for n, t in bucket})
    original = load_tensors(model_dir)
    result[f"{kind}_export_keys_equal"] = sorted(exported) == sorted(original)
    result[f"{kind}_export_bitwise"] = all(
        torch.equal(exported[k], original[k]) for k in original if k in exported
    )
    return result


def vl_batches() -> list[dict[str, torch.Tensor]]:
    """Qwen2.5-VL micro-batches: a row with two images of different grids between text
    and a shorter text-only row (right-padded); then a row with one image. Random
    patches; each token's three positions from models/vision.py."""
    g = torch.Generator().manual_seed(5)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, IMAGE_TOKEN, (n,), generator=g)

    def image(grid: list[int]) -> torch.Tensor:
        return torch.full((grid[0] * grid[1] * grid[2] // 4,), IMAGE_TOKEN)

    out = []
    for grids, rows in (
        ([[1, 4, 4], [1, 2, 6]], lambda a, b: [[text(3), a, text(2), b, text(4)], [text(9)]]),
        ([[1, 6, 4]], lambda a: [[text(2), a, text(5)]]),
    ):
        seqs = [torch.cat(parts) for parts in rows(*(image(x) for x in grids))]
        s = max(map(len, seqs))
        ids = torch.zeros(len(seqs), s, dtype=torch.int64)
        mask = torch.zeros(len(seqs), s)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        grid = torch.tensor(grids)
        positions = torch.stack([mrope_positions(row, grid, IMAGE_TOKEN, 2) for row in ids])
        patches = int(grid.prod(-1).sum())
        out.append(
            {
                "input_ids": ids,
                "labels": ids.roll(-1, dims=1),
                "attention_mask": mask,
                "mrope_positions": positions,
                "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=g),
                "image_grid_thw": grid,
            }
        )
    return out


def vl_equivalence(model_dir: Path, mp) -> dict:
    """A tiny Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration: logits
    and log-probs on every real token, the 3-D positions, and the export round trip."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    arch, chunks = load_reference(model_dir, mp, torch.float32)
    mbs = vl_batches()

    def fn(mb, out):
        logp, _ = vocab_parallel_logprobs(
            out, mb["labels"], TEMPERATURE, vocab_size=arch.vocab_size
        )
        return gather_vocab(out), logp

    outputs = run_microbatches(chunks, mbs, fn, forward_only=True)
    result = {}
    if mpu.is_pipeline_last_stage():
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        logits_diff = logp_diff = positions_diff = 0.0
        for mb, (logits, logp) in zip(mbs, outputs, strict=True):
            ids, real = mb["input_ids"], mb["attention_mask"].bool()
            kinds = (ids == IMAGE_TOKEN).int()
            with torch.no_grad():
                ref = hf(
                    input_ids=ids,
                    attention_mask=mb["attention_mask"].long(),
                    pixel_values=mb["pixel_values"],
                    image_grid_thw=mb["image_grid_thw"],
                    mm_token_type_ids=kinds,
                ).logits
            theirs, _ = hf.model.get_rope_index(
                ids, kinds, mb["image_grid_thw"], attention_mask=mb["attention_mask"].long()
            )
            ours = mb["mrope_positions"].permute(2, 0, 1)
            positions_diff = max(positions_diff, (ours - theirs)[:, real].abs().max().item())
            ref_logp = torch.log_softmax(ref / TEMPERATURE, -1).gather(-1, mb["labels"][..., None])
            logits = logits[..., : ref.shape[-1]]
            logits_diff = max(logits_diff, (logits - ref)[real].abs().max().item())
            logp_diff = max(logp_diff, (logp - ref_logp[..., 0])[real].abs().max().item())
        result |= {
            "vl_logits_maxdiff": logits_diff,
            "vl_logp_maxdiff": logp_diff,
            "vl_positions_maxdiff": positions_diff,
        }
    exported = {}
    for bucket in export_hf(chunks, arch, mp):
        exported.update({n: t.clone() for n, t in bucket})
    original = load_tensors(model_dir)
    result["vl_export_keys_equal"] = sorted(exported) == sorted(original)
    result["vl_export_bitwise"] = all(torch.equal(exported[k], original[k]) for k in original)
    # a frozen vision tower stays out of a weight sync's later versions
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(not name.startswith("visual."))
    trained = {n for bucket in export_hf(chunks, arch, mp, trained_only=True) for n, _ in bucket}
    result["vl_trained_only"] = trained == {k for k in original if not k.startswith("visual.")}
    return result


def critic(model_dir: Path, mp) -> dict:
    _, chunks = load_model(model_dir, mp, torch.float32, value_head=True)

    outs = run_microbatches(chunks, batches(), lambda mb, out: out[:, :12, 0], forward_only=True)
    if not mpu.is_pipeline_last_stage():
        return {}
    values = outs[0]
    gathered = gather_vocab(values.unsqueeze(-1))
    same = all(torch.equal(gathered[..., 0], gathered[..., i]) for i in range(gathered.shape[-1]))
    return {"critic_shape": list(values.shape), "critic_same_across_tp": same}


def train(model_dir: Path, mp, out: Path, distributed_optimizer: bool) -> dict:
    _, chunks = load_model(model_dir, mp, torch.float32)
    optim = OptimConfig(lr=1e-3, clip_grad=1.0, distributed_optimizer=distributed_optimizer)
    model = TrainableModel(chunks, optim, total_steps=10, group=mp.group)
    global_batch = batches(seed=11)
    mine = global_batch[mp.dp_rank :: mp.dp]

    def loss_fn(mb, out):
        logp, _ = vocab_parallel_logprobs(out, mb["labels"])
        mask = mb["loss_mask"]
        loss = -(logp * mask).sum()
        count = mask.sum().to(torch.int)
        return loss, count, {"loss_sum": loss.detach(), "tokens": count}

    stats = model.step(mine, loss_fn)
    params = {}
    for bucket in export_hf([c.module for c in model.chunks], read_hf_config(model_dir), mp):
        params.update({n: t.clone() for n, t in bucket})
    result = {}
    if dist.get_world_size() == 1:  # the same step by transformers and torch's own AdamW
        result = torch_step(model_dir, mine, optim, params)
    if dist.get_rank() == 0:
        torch.save(params, out / "trained.pt")

    def poisoned(mb, out):  # a non-finite loss on one data-parallel rank only
        loss, count, metrics = loss_fn(mb, out)
        return loss * (float("nan") if mp.dp_rank == 0 else 1.0), count, metrics

    bad = model.step(mine, poisoned)
    after = {}
    for bucket in export_hf([c.module for c in model.chunks], read_hf_config(model_dir), mp):
        after.update({n: t.clone() for n, t in bucket})
    return result | {
        "train_updated": stats["updated"],
        "train_grad_norm": stats["grad_norm"],
        "nonfinite_skipped": bad["nonfinite"] and not bad["updated"],
        "nonfinite_weights_kept": all(torch.equal(after[n], params[n]) for n in params),
    }


def checkpointed(model_dir: Path, mp, out: Path) -> dict:
    """A step, a save, another step, a load: the load brings back the saved weights. Over
    the ranks holding the model (all of them, or a group of the world)."""
    _, chunks = load_model(model_dir, mp, torch.float32)
    model = TrainableModel(chunks, OptimConfig(lr=1e-2), 10, group=mp.group)
    batch = batches(seed=5)[mp.dp_rank :: mp.dp]

    def loss_fn(mb, out):
        logp, _ = vocab_parallel_logprobs(out, mb["labels"])
        count = mb["loss_mask"].sum().to(torch.int)
        return -(logp * mb["loss_mask"]).sum(), count, {}

    def weights() -> list[torch.Tensor]:
        return [p.detach().clone() for c in model.modules for p in c.parameters()]

    model.step(batch, loss_fn)
    with world_of(mp.group):
        checkpoint.save(out / "ckpt", 1, {"actor": model}, {}, keep_last=1)
    saved = weights()
    model.step(batch, loss_fn)
    moved = not all(map(torch.equal, saved, weights()))
    with world_of(mp.group):
        checkpoint.load(out / "ckpt", 1, {"actor": model})
    back = all(map(torch.equal, saved, weights()))
    return {"checkpoint_moved": moved, "checkpoint_restored": back}


def engine_after_stream(model_dir: Path, group, out: Path, rank: int) -> dict:
    """A transformers engine on a rank outside the model's group, fed by the stream."""
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights(stream_buckets(None, 0, group, torch.device("cpu")))
    torch.save(dict(engine.model.state_dict()), out / f"engine{rank}.pt")
    return {"engine": True}


def torch_step(model_dir: Path, mbs: list[dict], optim: OptimConfig, ours: dict) -> dict:
    """One step of transformers' model with torch.optim.AdamW (weight decay on matrices
    only, as megatron groups it) and clip_grad_norm_: its largest difference from ours."""
    hf = load_hf(model_dir).train()
    named = list(hf.named_parameters())
    groups = [
        {"params": [p for _, p in named if p.dim() > 1], "weight_decay": optim.weight_decay},
        {"params": [p for _, p in named if p.dim() <= 1], "weight_decay": 0.0},
    ]
    betas = (optim.adam_beta1, optim.adam_beta2)
    adam = torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.adam_eps)
    count = sum(mb["loss_mask"].sum() for mb in mbs)
    for mb in mbs:
        logits = hf(mb["input_ids"]).logits
        logp = torch.log_softmax(logits, -1).gather(-1, mb["labels"][..., None]).squeeze(-1)
        (-(logp * mb["loss_mask"]).sum() / count).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), optim.clip_grad))
    adam.step()
    state = hf.state_dict()
    diff = max(float((ours[n] - state[n]).abs().max()) for n in ours)
    return {"torch_step_maxdiff": diff, "torch_grad_norm": norm}


def schedule(model_dir: Path, mp) -> dict:
    """Warmup then constant: the LR after each of three steps."""
    _, chunks = load_model(model_dir, mp, torch.float32)
    model = TrainableModel(chunks, OptimConfig(lr=1e-3, warmup_steps=4), total_steps=10)

    def loss_fn(mb, out):
        logp, _ = vocab_parallel_logprobs(out, mb["labels"])
        return -logp.sum(), torch.tensor(logp.numel(), dtype=torch.int), {}

    return {"lrs": [model.step(batches(), loss_fn)["lr"] for _ in range(3)]}


def malformed(model_dir: Path, work: Path, mp) -> dict:
    """A checkpoint missing a tensor, and one with a wrong shape: errors name the tensor."""
    original = load_tensors(model_dir)
    name = "model.layers.1.mlp.up_proj.weight"
    cases = {
        "missing": {k: v for k, v in original.items() if k != name},
        "shape": {**original, name: original[name][:-1]},
    }
    messages = {}
    for case, tensors in cases.items():
        broken = work / f"broken_{case}"
        broken.mkdir(exist_ok=True)
        shutil.copy(model_dir / "config.json", broken / "config.json")
        save_file(tensors, broken / "model.safetensors")
        try:
            load_model(broken, mp, torch.float32)
            messages[f"malformed_{case}"] = "loaded without error"
        except ValueError as e:
            messages[f"malformed_{case}"] = str(e)
    return messages


def main() -> None:
    """One job from the command line, or each job of `--jobs FILE` (a JSON list of argument
    lists) in turn in the same processes: a process start costs more than a job."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--models", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--checks", default="equivalence,critic,train")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--sp", action="store_true", help="sequence parallel")
    parser.add_argument("--jobs", type=Path)
    parser.add_argument("--vl", type=Path, help="a tiny Qwen2.5-VL directory (check vl)")
    # only the first N ranks hold the model (rollout.placement=SEPARATE's train group)
    parser.add_argument("--train-ranks", type=int, default=None)
    args = parser.parse_args()
    init_distributed(timeout_s=60)
    jobs = json.loads(args.jobs.read_text()) if args.jobs else [sys.argv[1:]]
    for job in jobs:
        run(parser.parse_args(job))
    dist.barrier()  # no rank leaves while another still uses the world


def run(args: argparse.Namespace) -> None:
    parallel = ParallelConfig(
        tp=args.tp,
        pp=args.pp,
        vpp=args.vpp,
        first_stage_layers=args.first_stage_layers,
        ep=args.ep,
        cp=args.cp,
        sequence_parallel=args.sp,
        timeout_s=60,
    )
    mp = init_model_parallel(parallel, seed=1, ranks=args.train_ranks)
    args.out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    checks = args.checks.split(",")
    # SEPARATE's weight path: the first train rank and the ranks outside the model's group
    world = dist.get_world_size()
    members = [0, *range(args.train_ranks or world, world)]
    stream = "stream" in checks and dist.new_group(members, timeout=timedelta(seconds=60))
    if mp is None:  # a rank outside the model's group: it holds no model, it may host an engine
        result = {"idle": True}
        if stream:
            result |= engine_after_stream(args.models / "llama", stream, args.out, rank)
        (args.out / f"rank{rank}.json").write_text(json.dumps(result))
        return
    result = {}
    if "equivalence" in checks:
        for model_dir in sorted(p for p in args.models.iterdir() if p.is_dir()):
            result |= equivalence(model_dir.name, model_dir, mp)
            _, chunks = load_reference(model_dir, mp, torch.float32)
            result["layers"] = [layer.layer_number for c in chunks for layer in c.decoder.layers]
    if "vl" in checks:
        result |= vl_equivalence(args.vl, mp)
    if "critic" in checks:
        result |= critic(args.models / "qwen2", mp)
    if "train" in checks:
        result |= train(args.models / "llama", mp, args.out, args.distributed_optimizer)
    if "schedule" in checks:
        result |= schedule(args.models / "llama", mp)
    if stream:  # after the train step: the trained weights reach the other ranks' engines
        model_dir = args.models / "llama"
        _, chunks = load_model(model_dir, mp, torch.float32)
        arch = read_hf_config(model_dir)
        sync_weights_to_group(chunks, arch, mp, stream, 0, torch.device("cpu"), 4096)
        params = {}  # what was sent, exported again (a collective over the model's ranks)
        for bucket in export_hf(chunks, arch, mp):
            params.update({n: t.clone() for n, t in bucket})
        if rank == 0:
            torch.save(params, args.out / "sent.pt")
    if "checkpoint" in checks:
        result |= checkpointed(args.models / "llama", mp, args.out)
    if "malformed" in checks:
        result |= malformed(args.models / "llama", args.out, mp)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
