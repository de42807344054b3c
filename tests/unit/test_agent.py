"""The agent loop's bookkeeping with scripted token sequences (masks, log-probs, turn and
token limits, parse failures, tool errors and timeouts), the chat-template join checked
against the template's own rendering of the whole conversation, the tools and parser,
and the loop on the real transformers engine: every generated token's log-prob equals a
forward pass over the finished trajectory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from distflow_mc.agent.loop import AgentLoop, row_tools
from distflow_mc.agent.parser import get_parser, hermes
from distflow_mc.agent.tools import Calculator, Call, load_tools, run_calls
from distflow_mc.config.schema import AgentConfig
from distflow_mc.data.tiny import AGENT_TOKENS, CALLS, Lookup, make_tokenizer
from distflow_mc.rollout.engine import Generation, SamplingParams


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), AGENT_TOKENS)


class Scripted:
    """An engine that answers each call with the next scripted turn of each row, and
    records what it was asked (the loop's view of the engine protocol)."""

    def __init__(self, turns: list[list[list[int]]]) -> None:
        self.turns, self.seen = list(turns), []

    def generate(self, prompts, params: SamplingParams) -> Generation:
        self.seen.append(([list(p) for p in prompts], params))
        rows = self.turns.pop(0)
        assert len(rows) == len(prompts) and params.n == 1
        gen = Generation()
        for i, ids in enumerate(rows):
            ids = ids[: params.max_new_tokens]
            gen.prompt_index.append(i)
            gen.response_ids.append(torch.tensor(ids))
            gen.logprobs.append(-torch.arange(1, len(ids) + 1, dtype=torch.float32) / 10)
            gen.finish_reasons.append("stop" if ids[-1] in params.stop_token_ids else "length")
        return gen


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def lookup_call(tok, key: str) -> list[int]:
    return [*enc(tok, CALLS[int(key)]), tok.eos_token_id]


def params(stop: int) -> SamplingParams:
    return SamplingParams(n=1, max_new_tokens=1024, stop_token_ids=(stop,))


def loop_with(tok, tools=None, **config) -> AgentLoop:
    return AgentLoop(AgentConfig(**config), tok, tools or {"lookup": Lookup()})


def test_trajectory_is_the_sequence_the_engine_saw(tok):
    eos = tok.eos_token_id
    prompts = [enc(tok, "<|user|>key: 3\n<|assistant|>"), enc(tok, "<|user|>key: 5\n<|assistant|>")]
    call = lookup_call(tok, "3")
    assert len(call) == 2  # the call, eos
    engine = Scripted([[call, [*enc(tok, "7"), eos]], [[*enc(tok, "4"), eos]]])
    loop = loop_with(tok, max_turns=4, max_total_tokens=64)
    a, b = loop.run(engine, prompts, [loop.tools] * 2, params(eos))
    tool_part = enc(tok, "\n<|tool|>4\n<|assistant|>")  # the tiny template's tool turn
    assert a.ids == prompts[0] + call + tool_part + [*enc(tok, "4"), eos]
    assert a.mask == [0.0] * len(prompts[0]) + [1.0] * 2 + [0.0] * len(tool_part) + [1.0] * 2
    generated = [x for x, m in zip(a.logprobs, a.mask, strict=True) if m]
    assert generated == pytest.approx([-0.1, -0.2, -0.1, -0.2])
    assert all(x == 0 for x, m in zip(a.logprobs, a.mask, strict=True) if not m)
    assert (a.turns, a.tool_calls, a.tool_errors, a.finish) == (2, 1, 0, "stop")
    assert [m["role"] for m in a.messages] == ["assistant", "tool", "assistant"]
    assert a.messages[1]["content"] == "4" and a.messages[2]["content"] == "4"
    assert b.ids == prompts[1] + [*enc(tok, "7"), eos] and b.turns == 1 and b.tool_calls == 0
    # the second turn generated for the one trajectory still going, from its whole sequence
    assert engine.seen[1][0] == [prompts[0] + call + tool_part]
    assert engine.seen[0][1].seed != engine.seen[1][1].seed


def test_turn_limit(tok):
    eos = tok.eos_token_id
    prompt = enc(tok, "key: 1")
    loop = loop_with(tok, max_turns=1)
    (t,) = loop.run(Scripted([[lookup_call(tok, "1")]]), [prompt], [loop.tools], params(eos))
    assert t.finish == "turns" and t.tool_calls == 1 and len(t.messages) == 1
    assert t.ids == prompt + lookup_call(tok, "1")  # no tool result after the last turn


def test_token_limit_cuts_the_turn_and_the_engine_is_asked_for_no_more(tok):
    eos = tok.eos_token_id
    prompt = enc(tok, "key: 1")
    loop = loop_with(tok, max_turns=3, max_total_tokens=len(prompt) + 3)
    engine = Scripted([[[*enc(tok, "12345"), eos]]])
    (t,) = loop.run(engine, [prompt], [loop.tools], params(eos))
    assert engine.seen[0][1].max_new_tokens == 3
    assert len(t.ids) == len(prompt) + 3 and t.finish == "length" and sum(t.mask) == 3


def test_no_room_for_the_tool_result_ends_the_trajectory(tok):
    eos = tok.eos_token_id
    prompt = enc(tok, "key: 1")
    loop = loop_with(tok, max_turns=3, max_total_tokens=len(prompt) + 6)
    (t,) = loop.run(Scripted([[lookup_call(tok, "1")]]), [prompt], [loop.tools], params(eos))
    assert t.finish == "length" and t.ids == prompt + lookup_call(tok, "1")


def test_parse_failures_and_failing_tools_answer_in_the_conversation(tok):
    eos = tok.eos_token_id

    class Boom:
        name, description = "boom", "raises"
        parameters: ClassVar[dict] = {"type": "object", "properties": {}}

        def __call__(self, arguments, budget_s):
            raise RuntimeError("kaput")

    class Hang:
        name, description = "hang", "never returns in time"
        parameters: ClassVar[dict] = {"type": "object", "properties": {}}

        async def __call__(self, arguments, budget_s):
            await asyncio.sleep(60)

    class Stuck(Hang):
        name = "stuck"

        def __call__(self, arguments, budget_s):  # a plain tool that hangs: abandoned
            time.sleep(60)

    tools = {"boom": Boom(), "hang": Hang(), "stuck": Stuck(), "lookup": Lookup()}
    turn = (
        '<tool_call>{"name": "boom", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "hang", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "stuck", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "lookup", "arguments": {"key": "x"}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
        "<tool_call>{oops</tool_call><tool_call>"
    )
    engine = Scripted([[[*enc(tok, turn), eos]], [[*enc(tok, "9"), eos]]])
    # the default would wait 30 s for each hanging tool: their own budgets apply
    budgets = {"hang": 0.5, "stuck": 0.5}
    loop = loop_with(tok, tools, max_total_tokens=2048, tool_timeout_s=30, tool_timeouts=budgets)
    start = time.perf_counter()
    (t,) = loop.run(engine, [enc(tok, "go")], [tools], params(eos))
    assert time.perf_counter() - start < 20  # the budget, not the tools' 60 s
    said = [m["content"] for m in t.messages if m["role"] == "tool"]
    assert len(said) == 7 and all(s.startswith("error") for s in said)
    joined = "\n".join(said)
    for words in ("not valid JSON", "not closed", "kaput", "budget", "bad arguments", "unknown"):
        assert words in joined
    assert (t.tool_calls, t.tool_errors, t.tool_timeouts) == (7, 7, 2)
    assert t.finish == "stop" and t.turns == 2  # and the trajectory went on


CHATML = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("stop", [[], ["</tool_call>"]])
def test_chatml_join_equals_the_templates_own_rendering(tmp_path, stop):
    """Qwen's format: the turn's stop token <|im_end|> is the template's own end of the
    assistant message, so the join does not write it twice (or, stopping at </tool_call>,
    the join writes it); the finished sequence reads exactly as the template renders the
    whole conversation."""
    tok = make_tokenizer(tmp_path, ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"))
    tok.chat_template = CHATML
    end = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "key: 3"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    call = enc(tok, '<tool_call>{"name": "lookup", "arguments": {"key": "3"}}</tool_call>')
    turn = call if stop else [*call, end]
    engine = Scripted([[turn], [[*enc(tok, "4"), end]]])
    loop = loop_with(tok, max_total_tokens=512, stop=stop)
    (t,) = loop.run(engine, [enc(tok, prompt)], [loop.tools], params(end))
    whole = messages + t.messages
    assert [m["role"] for m in whole] == ["user", "assistant", "tool", "assistant"]
    want = tok.apply_chat_template(whole, tokenize=False).removesuffix("\n")
    assert tok.decode(t.ids, skip_special_tokens=False) == want


def test_hermes_parser():
    calls, errors = hermes(
        'x <tool_call>\n{"name": "a", "arguments": {"k": 1}}\n</tool_call> y '
        '<tool_call>{"name": "b", "arguments": "{\\"q\\": 2}"}</tool_call>'
    )
    assert [(c.name, c.arguments) for c in calls] == [("a", {"k": 1}), ("b", {"q": 2})]
    assert errors == []
    for bad in ("<tool_call>[1]</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'):
        assert hermes(bad)[0] == [] and len(hermes(bad)[1]) == 1
    assert hermes("no calls") == ([], [])
    assert get_parser("hermes") is hermes
    with pytest.raises(ValueError, match=r"rollout\.agent\.parser"):
        get_parser("nosuch")


def test_calculator_and_tool_runner():
    calc = {"calculator": Calculator()}
    results = run_calls(
        [
            (Call("calculator", {"expression": "(17 + 4) * 3"}), calc),
            (Call("calculator", {"expression": "2 ** 0.5"}), calc),
            (Call("calculator", {"expression": "9 ** 9 ** 9"}), calc),
            (Call("calculator", {"expression": "__import__('os')"}), calc),
            (Call("calculator", {"expression": "1 / 0"}), calc),
            (Call("calculator", {"expr": "1"}), calc),
        ],
        budget_s=2.0,
        max_chars=100,
    )
    texts = [r.text for r in results]
    assert texts[:2] == ["63", str(2**0.5)]
    assert all(t.startswith("error") for t in texts[2:])
    assert results[5].error == "bad_arguments" and results[2].error is None


def test_tools_run_concurrently_and_outputs_are_cut():
    class Slow:
        name, description = "slow", "sleeps"
        parameters: ClassVar[dict] = {"type": "object", "properties": {}}

        def __call__(self, arguments, budget_s):
            time.sleep(0.5)
            return {"many": "x" * 500}

    tools = {"slow": Slow()}
    start = time.perf_counter()
    results = run_calls([(Call("slow", {}), tools)] * 8, budget_s=10.0, max_chars=50)
    assert time.perf_counter() - start < 0.5 * 8 / 2  # not one after another
    assert all(r.error is None and r.text.endswith("(cut)") for r in results)


def test_load_tools_names_what_is_wrong():
    tools = load_tools(["distflow_mc.agent.tools.Calculator", "distflow_mc.data.tiny.Lookup"])
    assert set(tools) == {"calculator", "lookup"}
    with pytest.raises(ValueError, match=r"rollout\.agent\.tools"):
        load_tools(["distflow_mc.agent.tools.NoSuch"])
    with pytest.raises(ValueError, match="made no tool"):
        load_tools(["distflow_mc.agent.tools.schema"])  # a function that is not a tool
    with pytest.raises(ValueError, match="two tools"):
        load_tools(["distflow_mc.data.tiny.Lookup"] * 2)


def test_row_tools_column():
    assert row_tools({}) is None
    assert row_tools({"tools": '[{"type": "function", "function": {"name": "a"}}]'})[0]["type"]
    for bad in ("not json", "[1]", '{"function": {}}'):
        with pytest.raises(ValueError, match="tools"):
            row_tools({"tools": bad})


def always_lookup(text: str):
    """A parser for the test below: every turn calls the tool (a random model would not)."""
    return [Call("lookup", {"key": "1"})], []


def test_real_engine_logprobs_match_a_forward_of_the_trajectory(tmp_path: Path):
    """Turns generated in left-padded batches of different lengths, with tool results
    between: a forward pass over each finished trajectory gives the engine's log-probs at
    every generated token (the sequence is what the engine saw, token for token)."""
    from tests.tiny_hf import engine_and_update, load_hf

    model_dir = tmp_path / "m"
    tok = make_tokenizer(model_dir, AGENT_TOKENS)
    engine, _, _ = engine_and_update(model_dir, tok)
    loop = AgentLoop(
        AgentConfig(parser=f"{__name__}.always_lookup", max_turns=3, max_total_tokens=60),
        tok,
        {"lookup": Lookup()},
    )
    stops = tuple(range(10, 128))  # most tokens end a turn: several turns within budget
    params = SamplingParams(n=3, max_new_tokens=5, stop_token_ids=stops, seed=1)
    prompts = [enc(tok, "<|user|>key: 1\n<|assistant|>"), enc(tok, "key: 22")]
    asked = []
    generate = engine.generate

    def spy(rows, p):
        asked.append((len(rows), p.n))
        return generate(rows, p)

    engine.generate = spy
    done = loop.run(engine, prompts, [loop.tools] * 2, params)
    assert max(t.turns for t in done) >= 2
    # the first turn: each prompt once, for its 3 trajectories; then one row per trajectory
    assert asked[0] == (2, 3) and all(n == 1 for _, n in asked[1:])
    hf = load_hf(model_dir)
    for t in done:
        ids = torch.tensor([t.ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
        want = logp.gather(-1, ids[0, 1:, None])[:, 0]
        mask = torch.tensor(t.mask[1:]).bool()
        torch.testing.assert_close(
            torch.tensor(t.logprobs[1:])[mask], want[mask], atol=2e-5, rtol=0
        )


def test_turns_crossing_a_weight_update_keep_each_tokens_behaviour(tmp_path: Path):
    """rollout.partial for agents: new weights arrive at the 4th token boundary, inside the
    first turn; the turn goes on with them, later turns use them. Each trajectory marks the
    updates before its tokens, and every generated token's log-prob is that of a forward of
    the weights that drew it."""
    from tests.tiny_hf import SwapAfter, engine_and_update, load_hf

    model_dir = tmp_path / "m"
    tok = make_tokenizer(model_dir, AGENT_TOKENS)
    engine, _, new = engine_and_update(model_dir, tok)
    config = AgentConfig(parser=f"{__name__}.always_lookup", max_turns=3, max_total_tokens=80)
    loop = AgentLoop(config, tok, {"lookup": Lookup()})
    params = SamplingParams(n=2, max_new_tokens=6, stop_token_ids=(10, 11, 12), seed=1)
    prompts = [enc(tok, "<|user|>key: 1\n<|assistant|>"), enc(tok, "key: 22")]
    swap = SwapAfter(engine, 4, new)
    done = loop.run(engine, prompts, [loop.tools] * 2, params, interrupt=swap)
    assert swap.applied == 1 and max(t.turns for t in done) >= 2
    models = {0: load_hf(model_dir), 1: load_hf(model_dir)}
    models[1].load_state_dict(new, strict=False)
    crossed_in_a_turn = False
    for t in done:
        per_token = torch.zeros(len(t.ids), dtype=torch.int64)
        for start, count in t.versions:
            per_token[start:] = count
        ids, mask = torch.tensor([t.ids]), torch.tensor(t.mask).bool()
        drawn = per_token[mask]
        assert drawn[0] == 0 and drawn[-1] == 1, t.versions  # the swap came in turn 1
        assert (drawn.diff() >= 0).all()
        crossed_in_a_turn |= bool(t.mask[3 + len(prompts[t.prompt])])  # 4th token generated
        for version, model in models.items():
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            want = logp.gather(-1, ids[0, 1:, None])[:, 0]
            at = (mask & (per_token == version))[1:]
            got = torch.tensor(t.logprobs[1:])[at]
            torch.testing.assert_close(got, want[at], atol=2e-5, rtol=0)
    assert crossed_in_a_turn


def test_a_template_without_tool_messages_is_refused_by_name(tmp_path):
    tok = make_tokenizer(tmp_path)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('unknown role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="cannot render tool results"):
        loop_with(tok)


def test_agent_settings_are_checked_on_every_rank_before_any_model(tmp_path, monkeypatch):
    from distflow_mc.config.validate import load_config
    from distflow_mc.data.tiny import make_task
    from distflow_mc.stages.inputs import check_inputs
    from tests.conftest import compose_config

    monkeypatch.setenv("DISTFLOW_DATA_DIR", str(make_task(tmp_path)))
    base = ["experiment=cpu_tiny_agent"]
    assert set(check_inputs(load_config(compose_config(base)))) == {"lookup"}
    for override, message in (
        ("+rollout.agent.tool_timeouts.web=5", r"tool_timeouts names \['web'\]"),
        ("rollout.agent.tools=[distflow_mc.nosuch.Tool]", r"rollout\.agent\.tools"),
        ("rollout.agent.parser=nosuch", r"rollout\.agent\.parser"),
    ):
        with pytest.raises(ValueError, match=message):
            check_inputs(load_config(compose_config([*base, override])))
