"""Worker for tests/dist/test_data.py: redistribution between layouts on gloo.

    torchrun --nproc-per-node W data_worker.py --out DIR

Every source replica builds a deterministic batch; every rank can rebuild all of them, so
each rank checks what it received sample by sample. Results go to DIR/rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distflow_mc.data.batch import Batch
from distflow_mc.data.chunks import cut, split
from distflow_mc.data.redistribute import Balance, Packing, Pattern, Transfer, redistribute
from distflow_mc.parallel.dist import init_distributed
from distflow_mc.parallel.layout import Layout, Move, movement
from tests.chunks_ref import held as held_ref
from tests.dist.factory_devices import FactoryDevices

GROUP = 3  # samples per prompt


def source_batch(replica: int, seed: int) -> Batch:
    """With an even seed, a group's samples begin alike in every field (a prompt of 4-19
    tokens), but in replica 1 a sample whose advantages differ inside its prompt."""
    g = torch.Generator().manual_seed(seed * 100 + replica)
    n = GROUP * 2 * (1 + replica % 2)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    fields = {
        "input_ids": [torch.randint(0, 50000, (L,), generator=g) for L in lengths],
        "logprobs": [torch.randn(L, generator=g) for L in lengths],
        "mask": [torch.rand(L, generator=g) > 0.5 for L in lengths],
        "advantages": [torch.randn(L, generator=g).to(torch.bfloat16) for L in lengths],
    }
    if shares_prompts(seed):
        for head in range(0, n, GROUP):
            prompt = int(torch.randint(4, 20, (), generator=g))
            for values in fields.values():
                for i in range(head + 1, head + GROUP):
                    values[i] = torch.cat([values[head][:prompt], values[i]])
        if replica == 1:
            fields["advantages"][GROUP - 1][1] += 1
    uid = torch.arange(n) + 999 * replica  # groups of GROUP consecutive uids
    return Batch.from_sequences(
        fields,
        {"uid": uid, "group": uid // GROUP, "reward": torch.rand(n, 2, generator=g)},
        {
            "data_source": [f"src{replica}/é✓" for _ in range(n)],
            "ground_truth": [{"answer": int(u), "alts": [str(u)]} for u in uid.tolist()],
            "pixels": pixels(n, g, shared=shares_prompts(seed)),
        },
    )


def pixels(n: int, g: torch.Generator, shared: bool) -> list[torch.Tensor]:
    """A vision-language prompt's patches per sample: a tensor of its own size, the one
    object for all of a group's samples when `shared` (as a rollout's samples hold their
    prompt's images: it then travels once per group)."""
    out = [torch.randn(int(torch.randint(0, 4, (), generator=g)), 6, generator=g) for _ in range(n)]
    return [out[i - i % GROUP] for i in range(n)] if shared else out


def shares_prompts(seed: int) -> bool:
    return seed % 2 == 0


def same_sample(a: Batch, i: int, b: Batch, j: int) -> bool:
    return (
        all(torch.equal(a.token_slice(k, i), b.token_slice(k, j)) for k in a.tokens)
        and all(torch.equal(a.samples[k][i], b.samples[k][j]) for k in a.samples)
        and all(_same(a.objects[k][i], b.objects[k][j]) for k in a.objects)
    )


def _same(x: object, y: object) -> bool:
    """Objects equal; tensors bit for bit, in dtype and shape too."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    return x == y


PACKINGS = (Packing.CHUNKS, Packing.FIELDS)
KEEP = ("input_ids", "mask", "reward", "ground_truth")  # a destination that reads only these
# the first of two rounds: tokens (the rest, objects too, by all-to-all after), or all but
# the per-sample reward (which then rides in the second round's metadata all-gather)
ROUNDS = {
    "rounds": ("input_ids", "logprobs"),
    "reward round": ("input_ids", "logprobs", "mask", "advantages", "data_source", "ground_truth"),
}


def scenario(
    src: Layout,
    dst: Layout,
    seed: int,
    balance: Balance,
    pattern: Pattern = Pattern.AUTO,
    keep: tuple[str, ...] | None = None,
    rounds: tuple[str, ...] | None = None,
    packing: Packing = Packing.AUTO,
    stages: tuple | None = None,
    share: bool | None = True,
) -> dict:
    rank = dist.get_rank()
    # the ranks that hold the batch in the source phase pass it (only emitters' copies are
    # read); others pass None, as a rollout TP follower (or a rank of another group) would
    mine = source_batch(src.coords(rank)["dp"], seed) if rank in src.holders() else None
    phases: dict[str, float] = {}
    args = (balance, torch.device("cpu"), timedelta(seconds=60))
    sent = None  # tokens this rank's replica was sent (a group's common prefix once)
    if movement(src, dst) is Move.NONE:
        got = redistribute(mine, src, dst, *args, keep, pattern, phases, packing, stages)
    else:  # some fields may leave first (as while a reward stage runs), the rest after
        transfer = Transfer(src, dst, *args, pattern, phases, packing, stages, share=share)
        transfer.send(mine, rounds or keep)
        if rounds:
            transfer.send(mine)
        got = transfer.finish()
        sent = int(transfer.lengths.sum())
    reference = Batch.concat([source_batch(r, seed) for r in range(src.dp)])
    reference = reference.only(keep) if keep else reference
    view = stages[dst.coords(rank)["pp"]] if stages and rank in dst.ranks else None
    reference = reference.only(view) if view is not None else reference  # its stage's fields
    views: list = [None] * dist.get_world_size()
    seen = (dst.coords(rank)["dp"], got.samples["uid"].tolist(), got.num_tokens) if got else None
    dist.all_gather_object(views, seen)
    if got is None:  # a rank outside the destination's holders
        return {"holds": False, "holder": rank in dst.holders()}
    fields = sorted([*got.tokens, *got.samples, *got.objects])
    where = {int(u): i for i, u in enumerate(reference.samples["uid"])}
    exact = all(
        same_sample(got, j, reference, where[int(u)]) for j, u in enumerate(got.samples["uid"])
    )
    per_replica = {}
    for dp, replica_uids, tokens in filter(None, views):
        per_replica.setdefault(dp, []).append((replica_uids, tokens))
    replicas_agree = all(len({json.dumps(v) for v in vs}) == 1 for vs in per_replica.values())
    delivered = sorted(u for vs in per_replica.values() for u in vs[0][0])
    groups = {}
    for dp, vs in per_replica.items():
        for u in vs[0][0]:
            groups.setdefault(u // GROUP, set()).add(dp)
    tokens = [vs[0][1] for vs in per_replica.values()]
    items = reference.lengths.tolist()
    if balance.keep_groups:
        items = [sum(items[i : i + GROUP]) for i in range(0, len(items), GROUP)]
    counts = [len(vs[0][0]) for vs in per_replica.values()]
    # the token fields are gathered back together when a prefix was shared
    tensors = [*(got.tokens.values() if sent == got.num_tokens else []), *got.samples.values()]
    return {
        "holds": True,
        "holder": rank in dst.holders(),
        "fields": fields,
        "tokens": got.num_tokens,
        "tokens_sent": sent,
        "prompts_shared": shares_prompts(seed) and balance.keep_groups and share is True,
        "fields_as_kept": fields
        == sorted([*reference.tokens, *reference.samples, *reference.objects]),
        "phases_timed": movement(src, dst) is Move.NONE
        or {"meta", "exchange", "unpack"} <= set(phases),
        "exact_contents": exact,
        "exactly_once": delivered == sorted(reference.samples["uid"].tolist()),
        "replicas_agree": replicas_agree,
        "groups_intact": all(len(v) == 1 for v in groups.values()),
        "max_over_mean_tokens": max(tokens) / (sum(tokens) / len(tokens)),
        # a balanced partition is never off by more than its heaviest item
        "spread_within_largest_item": max(tokens) - min(tokens) <= max(items),
        "equal_counts": len(set(counts)) == 1,
        "balanced": movement(src, dst) is Move.EXCHANGE,
        "fast_path_same_object": (
            got is mine if movement(src, dst) is Move.NONE and keep is None else None
        ),
        # received fields that share one buffer: views, no unpacking copy
        "buffers": len({t.untyped_storage().data_ptr() for t in tensors}),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_distributed(timeout_s=60)
    w = dist.get_world_size()
    half = w // 2
    layouts = {
        f"dp{w}->dp{half}xtp2": (Layout("rollout", dp=w), Layout("train", dp=half, tp=2)),
        f"dp{half}xtp2->dp{w}": (Layout("train", dp=half, tp=2), Layout("rollout", dp=w)),
        f"dp{w}->dp{w}": (Layout("rollout", dp=w), Layout("train", dp=w, replicated=True)),
        # the step's move: rollout engines to a replicated TP trainer
        f"dp{w}->dp{half}xtp2 replicated": (
            Layout("rollout", dp=w),
            Layout("train", dp=half, tp=2, replicated=True),
        ),
        f"dp{half}xtp2->dp{half}xtp2": (
            Layout("train", dp=half, tp=2, replicated=True),
            Layout("train", dp=half, tp=2, replicated=True),
        ),
        # rollout.tp = parallel.tp: same replicas, the engine host's copy reaches its TP peer
        f"dp{half}xtp2->dp{half}xtp2 replicated": (
            Layout("rollout", dp=half, tp=2),
            Layout("train", dp=half, tp=2, replicated=True),
        ),
    }
    # per pipeline stage, the fields it reads: the first the inputs, middle ones none
    first, middle = ("input_ids", "mask"), ()
    layouts[f"dp{w}->pp{w} views"] = (
        Layout("rollout", dp=w),
        Layout("train", dp=1, pp=w, replicated=True),
        (first, *[middle] * (w - 2), None),
    )
    if w == 4:
        layouts["dp4->dp1xpp2xtp2 replicated views"] = (
            Layout("rollout", dp=4),
            Layout("train", dp=1, tp=2, pp=2, replicated=True),
            (first, None),
        )
        layouts["dp4->dp1xpp2xtp2"] = (Layout("rollout", dp=4), Layout("train", dp=1, tp=2, pp=2))
        # two groups of the world (rollout.placement=SEPARATE): ranks 2-3 roll out, 0-1 train;
        # only they send and receive, the samples leave the group that made them
        layouts["group dp2->group dp2"] = (
            Layout("rollout", dp=2, first=2),
            Layout("train", dp=2, replicated=True),
        )
        layouts["group dp2->group dp1xtp2 replicated"] = (
            Layout("rollout", dp=2, first=2),
            Layout("train", dp=1, tp=2, replicated=True),
        )
        layouts["group dp1xtp2->group dp2"] = (
            Layout("rollout", dp=1, tp=2, first=2),
            Layout("train", dp=2, replicated=True),
        )
        layouts["dp4->dp1xpp2xtp2 replicated"] = (
            Layout("rollout", dp=4),
            Layout("train", dp=1, tp=2, pp=2, replicated=True),
        )
    result = {}
    channel = dist.new_group(list(range(w)), timeout=timedelta(seconds=60)) if w == 4 else None
    mode = FactoryDevices()  # the placement rule holds on the exchange path too
    with mode:
        run_scenarios(layouts, result)
        result["cp"] = cp_moves()
        if channel is not None:
            result["empty batches"] = empty_moves(channel)
    result["factories without a device"] = sorted(mode.missing)
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))


def empty_moves(group: dist.ProcessGroup) -> dict:
    """A step with no sample anywhere (every prompt skipped) between two groups of the world,
    by each packing, over a group of its own (the SEPARATE data channel's): per packing,
    what this rank got (None: it holds none)."""
    src, dst = Layout("rollout", dp=2, first=2), Layout("train", dp=2, replicated=True)
    rank, out = dist.get_rank(), {}
    for packing in PACKINGS:
        mine = source_batch(src.coords(rank)["dp"], 0).select([]) if rank in src.ranks else None
        args = (Balance(), torch.device("cpu"), timedelta(seconds=60))
        got = redistribute(mine, src, dst, *args, packing=packing, group=group)
        seen = None if got is None else {"samples": len(got), "fields": sorted(got.names())}
        out[packing.value] = seen
        # in two rounds, the second (the reward) riding in the metadata all-gather, with
        # one replica's samples (none from the other)
        if rank == src.first:
            mine = source_batch(0, 0)
        transfer = Transfer(src, dst, *args, packing=packing, group=group)
        transfer.send(mine, ROUNDS["reward round"])
        transfer.send(mine, ("reward",))
        got = transfer.finish()
        want = source_batch(0, 0).only([*ROUNDS["reward round"], "reward"])
        at = {u: j for j, u in enumerate(want.samples["uid"].tolist())}
        uids = [] if got is None else got.samples["uid"].tolist()
        out[f"{packing.value} in two rounds"] = {
            "uids": uids,  # (each destination replica its share)
            "all": sorted(at),
            "as sent": all(same_sample(got, i, want, at[u]) for i, u in enumerate(uids)),
        }
    return out


def with_prompts(replica: int, seed: int) -> Batch:
    """`source_batch` with each sample's prompt length (1 to all of its tokens)."""
    batch = source_batch(replica, seed)
    uid = batch.samples["uid"]
    batch.samples["prompt_length"] = (uid * 7) % batch.lengths + 1
    return batch


def cp_moves() -> dict:
    """Moves into context-parallel layouts (CP=2), by each packing: what each rank holds
    of its replica's samples, against data/chunks.py's cut of them made here from the
    sources, field by field; and which true positions of each sample it holds."""
    w = dist.get_world_size()
    cases = {
        f"dp{w}->dp{w // 2}xcp2": (
            Layout("rollout", dp=w),
            Layout("train", dp=w // 2, cp=2, replicated=True),
            None,
        )
    }
    if w == 4:
        first = ("input_ids", "mask", "prompt_length")  # the first stage's view
        cases["dp4->dp1xcp2xpp2 views"] = (
            Layout("rollout", dp=4),
            Layout("train", dp=1, cp=2, pp=2, replicated=True),
            (first, None),
        )
        cases["group dp2->group dp1xcp2"] = (
            Layout("rollout", dp=2, first=2),
            Layout("train", dp=1, cp=2, replicated=True),
            None,
        )
    rank, out = dist.get_rank(), {}
    options = [
        (p, k, r) for p in Pattern if p is not Pattern.AUTO for k in PACKINGS for r in (1, 2)
    ]
    for seed, (name, (src, dst, stages)) in enumerate(cases.items()):
        for pattern, packing, rounds in options:
            key = f"{name} {pattern.value} {packing.value} rounds={rounds}"
            mine = with_prompts(src.coords(rank)["dp"], seed) if rank in src.holders() else None
            args = (Balance(), torch.device("cpu"), timedelta(seconds=60), pattern)
            transfer = Transfer(src, dst, *args, packing=packing, stages=stages)
            # two rounds: the tokens and prompt lengths first, the rest after (a reward)
            first = ("input_ids", "logprobs", "prompt_length") if rounds == 2 else None
            transfer.send(mine, first)
            if rounds == 2:
                transfer.send(mine)
            got = transfer.finish()
            if got is None:
                out[key] = None
                continue
            whole = Batch.concat([with_prompts(r, seed) for r in range(src.dp)])
            where = {int(u): i for i, u in enumerate(whole.samples["uid"])}
            mine = whole.select([where[int(u)] for u in got.samples["uid"]])
            view = stages[dst.coords(rank)["pp"]] if stages else None
            mine = mine.only(view) if view is not None else mine
            coords = dst.coords(rank)
            want = cut(mine, dst.cp, coords["cp"])
            want = want.only({*view, "positions"}) if view is not None else want
            same = sorted(got.names()) == sorted(want.names()) and torch.equal(
                got.offsets, want.offsets
            )
            same = same and all(torch.equal(got.tokens[k], want.tokens[k]) for k in want.tokens)
            same = same and all(torch.equal(got.samples[k], want.samples[k]) for k in want.samples)
            held, laid_out = {}, True  # against tests/chunks_ref.py, token by token
            firsts = split(mine).tolist()
            for i, (n, a) in enumerate(zip(mine.lengths.tolist(), firsts, strict=True)):
                ref = held_ref(n, a, dst.cp, coords["cp"])
                laid_out &= got.token_slice("positions", i).tolist() == [p for p, _ in ref]
                if "input_ids" in got.tokens:
                    ids, source = got.token_slice("input_ids", i), mine.token_slice("input_ids", i)
                    laid_out &= all(ids[k] == source[p] for k, (p, r) in enumerate(ref) if r)
                held[int(mine.samples["uid"][i])] = [n, [p for p, r in ref if r]]
            out[key] = {
                "received": int(transfer.lengths.sum()),  # tokens that reached this rank
                "replica": coords["dp"],
                "cp": coords["cp"],
                "stage": coords["pp"],
                "exact": same,
                "laid_out": laid_out,
                "fields": sorted(got.names()),
                "tokens": got.num_tokens,
                "whole_tokens": mine.num_tokens,
                "held": held,
            }
    return out


def run_scenarios(layouts: dict, result: dict) -> None:
    for seed, (name, (src, dst, *views)) in enumerate(layouts.items()):
        stages = views[0] if views else None
        result[name] = scenario(src, dst, seed, Balance(), stages=stages)
        options = [(p, k) for p in (Pattern.DIRECT, Pattern.LEADERS) for k in PACKINGS]
        for pattern, packing in options:
            result[f"{name} {pattern.value} {packing.value}"] = scenario(
                src, dst, seed, Balance(), pattern, packing=packing, stages=stages
            )
        result[name + " keep"] = scenario(src, dst, seed, Balance(), keep=KEEP, stages=stages)
        if movement(src, dst) is not Move.NONE:
            for pattern, packing in options:
                for label, first in ROUNDS.items():
                    result[f"{name} {pattern.value} {packing.value} {label}"] = scenario(
                        src,
                        dst,
                        seed,
                        Balance(),
                        pattern,
                        rounds=first,
                        packing=packing,
                        stages=stages,
                    )
        if stages:
            continue
        result[name + " split groups"] = scenario(src, dst, seed, Balance(keep_groups=False))
        result[name + " unshared"] = scenario(src, dst, seed, Balance(), share=False)
        groups = sum(len(source_batch(r, seed)) for r in range(src.dp)) // GROUP
        if groups % dst.dp == 0:
            result[name + " equal counts"] = scenario(src, dst, seed, Balance(equal_counts=True))


if __name__ == "__main__":
    main()
