"""Redistribution between parallel layouts on real gloo ranks (2 and 4), by both patterns
(direct all-to-all, leaders + broadcast) and both packings (one all-to-all per round, one
per field), in one round or two (token fields first, as while a reward stage runs; or all
but the per-sample reward, which then rides in the metadata all-gather), and with a
kept-field subset: every sample arrives exactly once with identical contents (tokens,
floats, bf16, bools, strings, dicts, a tensor per sample as an image's patches are), a
group's common prefix travels once (but where a field differs), uids and groups survive,
replicas agree, exactly the kept fields arrive (with per-stage views: the first pipeline
stage gets the inputs, the middle ones no fields, the last all), only the holders get a
batch, same layouts take the fast path."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_worker

pytestmark = pytest.mark.dist
WORKER = str(ROOT / "tests" / "dist" / "data_worker.py")


@pytest.mark.parametrize("world", [2, 4])
def test_redistribution(tmp_path, world):
    results = run_worker(world, WORKER, tmp_path)
    assert len(results[0]) >= 30
    if world == 4:  # between two groups of the world, only the destination group receives
        fields = sorted(["input_ids", "logprobs", "mask", "advantages", "uid", "group", "reward"])
        fields = sorted([*fields, "data_source", "ground_truth", "pixels"])
        received = {}
        for rank, result in enumerate(results):
            # a step without a sample moves as an empty batch, by either packing
            for packing, got in result.pop("empty batches").items():
                if packing.endswith("in two rounds"):  # one replica's samples, none from the other
                    assert got["as sent"], (rank, packing)
                    received.setdefault(packing, [got["all"], []])[1].extend(got["uids"])
                    continue
                want = {"samples": 0, "fields": fields} if rank < 2 else None
                assert got == want, (rank, packing)
        for packing, (every, uids) in received.items():  # each sample once, over the replicas
            assert sorted(uids) == every, packing
        for rank, result in enumerate(results):
            groups = [r for name, r in result.items() if name.startswith("group ")]
            assert len(groups) >= 3 * 15 and all(r["holds"] == (rank < 2) for r in groups), rank
    check_context_parallel([result.pop("cp") for result in results])
    moved = [
        r for res in results for r in res.values() if isinstance(r, dict) and r.get("tokens_sent")
    ]
    assert {r["prompts_shared"] for r in moved} == {True, False}  # both kinds of batch moved
    for rank, result in enumerate(results):
        assert result.pop("factories without a device") == [], rank
        for name, r in result.items():
            where = f"rank {rank}, {name}"
            assert r["holds"] == r["holder"], where  # the holders, and only they, get a batch
            if not r["holds"]:
                continue
            assert r["fields_as_kept"], where
            assert r["phases_timed"], where
            assert r["exact_contents"], where
            assert r["exactly_once"], where
            assert r["replicas_agree"], where
            assert r["groups_intact"] or "split groups" in name, where
            if r["tokens_sent"] is not None:  # moved: a group's common prefix went once
                shared = r["prompts_shared"]
                assert (r["tokens_sent"] < r["tokens"]) == shared, (where, r["tokens_sent"])
            if r["balanced"]:  # same layouts keep each replica's samples where they are
                assert r["spread_within_largest_item"], (where, r["max_over_mean_tokens"])
            if "equal counts" in name and r["balanced"]:
                assert r["equal_counts"], where
            if "views" in name:  # a stage gets what it reads: the first the inputs, middle none
                stage = rank // 2 if "tp2" in name else rank
                last = (world // 2 if "tp2" in name else world) - 1
                want = {0: ["group", "input_ids", "mask", "uid"], last: None}.get(stage)
                if want is None and stage != last:
                    want = ["group", "uid"]
                if want is not None:
                    assert r["fields"] == want, where
                else:
                    assert {"logprobs", "reward"} <= set(r["fields"]) or "keep" in name, where
            same = (f"dp{world}->dp{world}", f"dp{world // 2}xtp2->dp{world // 2}xtp2")
            if name.endswith(" fields") and r["balanced"]:  # one round: fields are views
                assert r["buffers"] == 1, where
            base = name.removesuffix(" chunks").removesuffix(" fields")
            if base.removesuffix(" direct").removesuffix(" leaders") in same:
                assert r["fast_path_same_object"], where
            # same replicas: a broadcast, not a move; each replica keeps its samples
            if name.startswith(f"dp{world // 2}xtp2->") and "replicated" in name:
                assert r["fast_path_same_object"] is None and not r["balanced"], where


def check_context_parallel(results: list[dict]) -> None:
    """Each CP rank of a destination replica receives only its chunks of every sample of
    the replica (data/chunks.py's cut of the sources, field by field, its `labels` and
    `positions` too: the tokens that reached it are those it holds), its stage's fields
    only, by either pattern and packing, in one round or two; the two ranks of a pair hold
    every token of every sample once between them, each about half."""
    for name in results[0]:
        got = [r[name] for r in results]
        pairs: dict[tuple[int, int], list[dict]] = {}
        for rank, r in enumerate(got):
            if r is None:
                assert name.startswith("group") and rank >= 2, (name, rank)
                continue
            assert r["exact"] and r["laid_out"], (name, rank)
            assert {"positions", "input_ids"} <= set(r["fields"]), (name, rank)
            if "views" in name and r["stage"] == 0:  # the first stage's fields, no labels
                assert not {"logprobs", "labels"} & set(r["fields"]), (name, rank)
            else:
                assert "labels" in r["fields"], (name, rank)
            pairs.setdefault((r["replica"], r["stage"]), []).append(r)
        for pair in pairs.values():
            assert sorted(r["cp"] for r in pair) == [0, 1], name
            for uid, (n, positions) in pair[0]["held"].items():
                other = pair[1]["held"][uid][1]
                assert sorted(positions + other) == list(range(n)), (name, uid)
            for r in pair:  # half of each sample, but the padding to a multiple of 4 per part
                assert r["tokens"] <= r["whole_tokens"] / 2 + 4 * len(r["held"]), name
                assert r["received"] == r["tokens"], name  # only its chunks travelled to it
