"""rollout.stream's bookkeeping (agent/stream.py) with an engine that calls the lookup tool
with each prompt's own key and then answers, and a tool whose key-7 answer waits for the
test to release it: which groups a step takes, defers, waits for and drops, and which
weight version drew each token."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
import torch

from distflow_mc.agent.loop import AgentLoop
from distflow_mc.agent.stream import AgentStream
from distflow_mc.config.schema import AgentConfig
from distflow_mc.data.batch import Batch
from distflow_mc.data.tiny import AGENT_TOKENS, CALLS, Lookup, make_tokenizer
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.engine import Generation, SamplingParams


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), AGENT_TOKENS)


class KeyCaller:
    """First turn: the lookup call for the prompt's key; after the tool's answer: "0"."""

    def __init__(self, tok) -> None:
        self.tok, self.calls = tok, 0

    def generate(self, prompts, params: SamplingParams) -> Generation:
        self.calls += 1
        gen, eos = Generation(), self.tok.eos_token_id
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            if "<|tool|>" in text:
                out = [*self.tok.encode("0", add_special_tokens=False), eos]
            else:
                key = int(text.split("key: ")[1][0])
                out = [*self.tok.encode(CALLS[key], add_special_tokens=False), eos]
            for _ in range(params.n):
                gen.prompt_index.append(i)
                gen.response_ids.append(torch.tensor(out))
                gen.logprobs.append(torch.zeros(len(out)))
                gen.finish_reasons.append("stop")
        return gen


class Gated(Lookup):
    """Key 7 answers once the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> str:
        if arguments["key"] == "7":
            assert self.gate.wait(30)
        return super().__call__(arguments, budget_s)


def prompts(tok, keys: str, first_uid: int) -> Batch:
    if not keys:  # a step whose prompts were all skipped
        return Batch.empty({"input_ids": torch.int64}, [], torch.device("cpu"))
    ids = [torch.tensor(tok.encode(f"<|user|>key: {k}\n<|assistant|>")) for k in keys]
    uid = torch.arange(first_uid, first_uid + len(keys))
    return Batch.from_sequences({"input_ids": ids}, {"uid": uid, "group": uid.clone()}, {})


def stream(tok, drop: bool) -> tuple[AgentStream, Gated, list[int]]:
    tool, version = Gated(), [0]
    config = AgentConfig(max_turns=2, max_total_tokens=64)
    loop = AgentLoop(config, tok, {"lookup": tool})
    return AgentStream(loop, KeyCaller(tok), lambda: version[0], drop), tool, version


def take(s: AgentStream, batch: Batch, step: int, m: Metrics, tok) -> list[int]:
    params = SamplingParams(n=2, max_new_tokens=8, stop_token_ids=(tok.eos_token_id,))
    tools = [s.loop.tools] * len(batch)
    done, taken = s.take(batch, tools, params, step, 4, m)
    assert [t.prompt for t in done] == [j for j in range(len(taken)) for _ in range(2)]
    return taken.samples["uid"].tolist()


def test_a_slow_group_is_deferred_then_waited_for(tok):
    s, tool, version = stream(tok, drop=False)
    m0 = Metrics()
    got = take(s, prompts(tok, "71234568", 0), 0, m0, tok)  # two shares: 8 groups, take 4
    assert len(got) == 4 and 0 not in got  # the stalled group is not waited for
    assert m0.totals["stream/deferred_groups"] == 4 and 0 in s.pending()
    version[0] = 1  # the next step's weights
    timer = threading.Timer(0.3, tool.gate.set)  # the slow tool answers during step 1
    timer.start()
    m1 = Metrics()
    done, taken = s.take(
        prompts(tok, "9123", 8),
        [s.loop.tools] * 4,
        SamplingParams(n=2, max_new_tokens=8, stop_token_ids=(tok.eos_token_id,)),
        1,
        4,
        m1,
    )
    timer.join()
    uids = taken.samples["uid"].tolist()
    assert uids == [u for u in range(8) if u not in got]  # the due groups, in start order
    assert m1.totals["stream/due_groups"] == 4 and m1.totals["stream/dropped_groups"] == 0
    slow = [t for t in done if t.prompt == 0]
    for t in slow:  # turn 1 drawn by version 0, turn 2 (after the tool) by version 1
        (p, v0), (start, v1) = t.versions
        assert (v0, v1) == (0, 1) and t.mask[p] == 1 and t.mask[start] == 1
        assert t.mask[start - 1] == 0  # the tool's tokens in between
    assert sorted(s.pending()) == [8, 9, 10, 11]
    # every group is taken once
    assert sorted(got + uids + take(s, prompts(tok, "", 12), 2, Metrics(), tok)) == list(range(12))


def test_drop_leaves_a_slow_due_group_out(tok):
    s, tool, _ = stream(tok, drop=True)
    got = take(s, prompts(tok, "71234568", 0), 0, Metrics(), tok)
    assert 0 not in got
    m = Metrics()
    second = take(s, prompts(tok, "9123", 8), 1, m, tok)  # the gate stays shut
    assert 0 not in second and len(second) == 4
    assert m.totals["stream/dropped_groups"] == 1 and 0 not in s.pending()
    tool.gate.set()  # its late answer is ignored
    third = take(s, prompts(tok, "", 12), 2, Metrics(), tok)
    assert 0 not in third and len(set(got + second + third)) == len(got + second + third)


def test_single_turns_in_pieces_equal_whole_generations_and_defer_long_ones(tmp_path):
    """Single turns (no tools) streamed in pieces of 3 tokens through the real engine:
    each response, its log-probs and finish equal one whole greedy generation of its prompt
    (a piece goes on from its tokens so far); a step takes the groups that finished first,
    the longer ones go into the next step, and every group is taken once."""
    from tests.tiny_hf import engine_and_update

    tok = make_tokenizer(tmp_path, AGENT_TOKENS)
    engine, _, _ = engine_and_update(tmp_path, tok)
    chunk, keys = 3, "0123456789"
    batch = prompts(tok, keys, 0)
    rows = [batch.token_slice("input_ids", i).tolist() for i in range(len(batch))]
    # greedy; a third of the vocabulary stops: responses of many lengths, some cut at 12
    params = SamplingParams(
        n=2, temperature=0.0, max_new_tokens=12, stop_token_ids=tuple(range(40, 128, 3))
    )
    whole = engine.generate(rows, replace(params, n=1))
    lengths = [len(r) for r in whole.response_ids]
    assert len(set(lengths)) >= 3 and min(lengths) <= chunk < max(lengths)
    s = AgentStream(AgentLoop(AgentConfig(), tok, {}), engine, lambda: 0, False, chunk)
    quota = 4
    m = Metrics()
    done, taken = s.take(batch, [{}] * len(batch), params, 0, quota, m)
    # all groups start in the first call: group g finishes in call ceil(length / chunk)
    need = [-(-n // chunk) for n in lengths]
    calls = sorted(need)[quota - 1]
    first = [g for g in range(len(keys)) if need[g] <= calls][:quota]
    assert taken.samples["uid"].tolist() == first
    assert m.totals["stream/deferred_groups"] == len(keys) - quota
    rest, later = s.take(prompts(tok, "", 10), [], params, 1, quota * 2, Metrics())
    later_uids = later.samples["uid"].tolist()
    got = taken.samples["uid"].tolist() + later_uids
    assert sorted(got) == list(range(len(keys))) and not s.pending()
    for t, g in [(t, first[t.prompt]) for t in done] + [(t, later_uids[t.prompt]) for t in rest]:
        p = len(rows[g])
        assert t.ids[p:] == whole.response_ids[g].tolist()
        assert t.mask == [0.0] * p + [1.0] * lengths[g]
        torch.testing.assert_close(
            torch.tensor(t.logprobs[p:]), whole.logprobs[g], atol=1e-5, rtol=0
        )
        assert t.finish == whole.finish_reasons[g] and t.turns == 1


def test_weights_arriving_during_a_step_go_in_between_pieces(tmp_path):
    """rollout.partial with the stream: new weights pending before the second engine call go
    in there; every response's first piece is drawn by version 0 and the rest by version 1,
    each token's log-prob that of a forward of the weights that drew it (the kept cache of
    the old weights is not used for the new)."""
    from tests.tiny_hf import SwapAfter, engine_and_update, load_hf

    tok = make_tokenizer(tmp_path, AGENT_TOKENS)
    engine, _, new = engine_and_update(tmp_path, tok)
    swap = SwapAfter(engine, 2, new)  # pending at the stream's second check
    loop = AgentLoop(AgentConfig(), tok, {})
    s = AgentStream(loop, engine, lambda: swap.applied, False, 3, swap)
    params = SamplingParams(n=2, max_new_tokens=9, stop_token_ids=(), seed=5)
    done, _ = s.take(prompts(tok, "123", 0), [{}] * 3, params, 0, 3, Metrics())
    assert swap.applied == 1 and len(done) == 6
    models = {0: load_hf(tmp_path), 1: load_hf(tmp_path)}
    models[1].load_state_dict(new, strict=False)
    for t in done:
        p = len(t.ids) - 9
        assert t.versions == [(p, 0), (p + 3, 1), (p + 6, 1)]
        ids = torch.tensor([t.ids])
        for version, span in ((0, slice(p, p + 3)), (1, slice(p + 3, p + 9))):
            with torch.no_grad():
                logp = torch.log_softmax(models[version](ids).logits[0, :-1].float(), -1)
            want = logp.gather(-1, ids[0, 1:, None])[:, 0]
            got = torch.tensor(t.logprobs)[span]
            torch.testing.assert_close(got, want[span.start - 1 : span.stop - 1], atol=2e-5, rtol=0)
