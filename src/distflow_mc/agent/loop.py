"""Multi-turn, tool-calling rollouts, token in and token out.

Every turn, all active trajectories of the rank generate in one batched engine call; each
turn's text is parsed for tool calls, the calls of all trajectories run concurrently with
their budgets, and the results are appended through the chat template. A trajectory is
one token sequence that only ever grows: generated tokens go in as the engine returned
them (with their log-probs, loss mask 1) and template and tool tokens as the template
renders them (mask 0); nothing is re-tokenized from text, which would shift tokens and
break the match between the engine's and the trainer's log-probs. A turn ends at the end
of sequence, or at a `rollout.agent.stop` token. A trajectory ends when a turn makes no
call ("stop"), at `max_total_tokens` or a turn's `max_new_tokens`
("length"), or after `max_turns` turns that all called tools ("turns").

Without tools the loop generates single turns (rollout.stream of single-turn tasks): a
trajectory is the prompt and one response of at most the sampling's `max_new_tokens`. A
stream may generate a turn in pieces (`chunk` tokens an engine call): a piece that ends
without a stop goes on from its tokens so far in the next call, with the others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from distflow_mc.agent.parser import get_parser
from distflow_mc.agent.tools import Call, Result, Tool, gather_calls
from distflow_mc.config.schema import AgentConfig
from distflow_mc.rollout.engine import Images, RolloutEngine, SamplingParams
from distflow_mc.rollout.hf_engine import Interrupt

MARK = "\x00distflow-assistant-turn\x00"


class ToolTurns:
    """The tokens between the end of a generated assistant turn and the start of the next:
    the template's end of the assistant message, the tool messages, the generation prompt.
    Rendered after a fixed conversation and cut after the assistant's content, so the
    sequence so far is never rendered again. When the turn ended with the stop token the
    template itself writes there (Qwen's <|im_end|>), it is not written twice."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.head = [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARK}]
        try:  # a template that cannot: now, on every rank, before any model
            self.render([{"role": "tool", "content": "probe"}])
        except Exception as e:
            raise ValueError(
                "rollout.agent: the tokenizer's chat template cannot render tool results"
                f" ({type(e).__name__}: {e}); use a tokenizer whose template has a tool role"
            ) from e

    def render(self, tool_messages: list[dict[str, str]]) -> str:
        text = self.tokenizer.apply_chat_template(
            self.head + tool_messages, tokenize=False, add_generation_prompt=True
        )
        cut = text.rfind(MARK)
        if cut < 0:
            raise ValueError("the tokenizer's chat template does not render assistant content")
        return text[cut + len(MARK) :]

    def tokens(self, tool_messages: list[dict[str, str]], stop_text: str) -> list[int]:
        text = self.render(tool_messages)
        if stop_text and text.startswith(stop_text):
            text = text[len(stop_text) :]
        return self.tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Trajectory:
    prompt: int  # its prompt's index in the rank's batch
    ids: list[int]  # prompt, then every turn and tool result
    logprobs: list[float]  # the engine's, on generated tokens; 0 elsewhere
    mask: list[float]  # 1 on generated tokens
    tools: dict[str, Tool]  # what its prompt offers
    limit: int  # the most tokens it may hold
    messages: list[dict[str, str]] = field(default_factory=list)  # assistant and tool turns
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0  # unparsable calls and failed ones (timeouts included)
    tool_timeouts: int = 0
    finish: str = "stop"  # stop | length | turns
    turn_start: int = -1  # where its turn being generated in pieces began (-1: none)
    # (first token, version) of each weight version that drew its tokens: rollout.stream's
    # versions per turn, or rollout.partial's count of weight updates before them
    versions: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the reward function sees of it (as extra_info["trajectory"])."""
        return {
            "messages": self.messages,
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "finish": self.finish,
        }


class _Counted:
    """rollout.partial's interrupt, counting the updates it applied."""

    def __init__(self, interrupt: Interrupt) -> None:
        self.interrupt, self.applied = interrupt, 0

    def pending(self) -> bool:
        return self.interrupt.pending()

    def apply(self) -> None:
        self.interrupt.apply()
        self.applied += 1


@dataclass
class Pending:
    trajectory: Trajectory
    stop_text: str
    calls: list[Call]
    errors: list[str]
    more: bool = False  # a turn cut at its piece's end, to go on (no calls)


class AgentLoop:
    def __init__(
        self, config: AgentConfig, tokenizer: PreTrainedTokenizerBase, tools: dict[str, Tool]
    ) -> None:
        """No `tools`: single turns, as a task without tools generates them."""
        self.config, self.tokenizer, self.tools = config, tokenizer, tools
        self.parse = get_parser(config.parser)
        self.turns = ToolTurns(tokenizer) if tools else None
        self.stop_ids = stop_ids(tokenizer, config.stop) if tools else ()

    def offered(self, row_tools: list[dict[str, Any]] | None) -> dict[str, Tool]:
        """The tools a prompt offers: those its `tools` column names, else all."""
        if row_tools is None:
            return self.tools
        return {s["function"]["name"]: self.tools[s["function"]["name"]] for s in row_tools}

    def start(
        self, prompts: list[list[int]], tools: list[dict[str, Tool]], params: SamplingParams
    ) -> list[Trajectory]:
        """`params.n` trajectories per prompt, prompt i's at [i*n, (i+1)*n); without tools
        each may hold its prompt and `params.max_new_tokens` more."""
        c, single = self.config, self.turns is None
        return [
            Trajectory(
                i,
                list(p),
                [0.0] * len(p),
                [0.0] * len(p),
                tools[i],
                len(p) + params.max_new_tokens if single else c.max_total_tokens,
            )
            for i, p in enumerate(prompts)
            for _ in range(params.n)
        ]

    def run(
        self,
        engine: RolloutEngine,
        prompts: list[list[int]],
        tools: list[dict[str, Tool]],
        params: SamplingParams,
        interrupt: Interrupt | None = None,
        images: list[Images | None] | None = None,
    ) -> list[Trajectory]:
        """`params.n` trajectories per prompt (prompt i's at [i*n, (i+1)*n)); `params`
        applies per turn, its seed moved on every turn. With `interrupt` (rollout.partial)
        a turn goes on with the weights that arrive during it: each trajectory's `versions`
        marks how many updates came before its tokens (tool tokens: as the turn before).
        A vision-language model's prompts bring their `images`, which every turn of their
        trajectories keeps."""
        trajectories = self.start(prompts, tools, params)
        counted = _Counted(interrupt) if interrupt is not None else None
        if counted is not None:
            for t in trajectories:
                t.versions = [(0, 0)]
        active = trajectories
        for turn in range(self.config.max_turns):
            if not active:
                break
            step = replace(params, seed=params.seed + 1_000_003 * turn)
            first = prompts if turn == 0 else None
            pending = self.turn(engine, active, step, first, counted, images=images)
            active = self.answer(pending)
        return trajectories

    def turn(
        self,
        engine: RolloutEngine,
        active: list[Trajectory],
        params: SamplingParams,
        prompts: list[list[int]] | None = None,
        counted: _Counted | None = None,
        chunk: int = 0,
        images: list[Images | None] | None = None,
    ) -> list[Pending]:
        """One engine call, a turn of each of `active`; the tool calls they make. With
        `prompts` (their first turn, `params.n` trajectories of each prompt in order), the
        engine gets each prompt once with n samples (an engine encodes it once for them).
        With `counted` (rollout.partial), the call may take new weights at a token boundary:
        each part of a turn is marked with the count of updates before it. With `chunk`,
        the call generates at most that many tokens: a turn it cuts is Pending with `more`
        (and the engine keeps its keys and values for the next call).
        """
        # what each may still generate in this turn: > 0 (prompts are shorter, checked;
        # answer() ends those left without room)
        room = [min(t.limit - len(t.ids), params.max_new_tokens - _generated(t)) for t in active]
        step = replace(
            params,
            n=1,
            max_new_tokens=min(max(room), chunk or max(room)),
            stop_token_ids=(*params.stop_token_ids, *self.stop_ids),
        )
        rows = prompts if prompts is not None else [t.ids for t in active]
        step = replace(step, n=params.n) if prompts is not None else step
        before = counted.applied if counted is not None else 0
        extra = {"interrupt": counted} if counted is not None else {}
        if chunk:  # the rows cut go on in the next call: the engine keeps their cache
            extra["keep"] = True
        if images is not None:  # (per prompt: a trajectory keeps its prompt's)
            extra["images"] = images if prompts is not None else [images[t.prompt] for t in active]
        gen = engine.generate(rows, step, **extra)
        pending = []
        for i, (t, r, ids, logp, finish) in enumerate(
            zip(active, room, gen.response_ids, gen.logprobs, gen.finish_reasons, strict=True)
        ):
            start = len(t.ids)
            pending += self._turn(t, ids.tolist(), logp.tolist(), finish, r, step.max_new_tokens)
            if counted is None:
                continue
            for j, count in enumerate(gen.segments[i] if gen.segments else [len(ids)]):
                if count and start < len(t.ids):  # (a part past the budget's cut is gone)
                    t.versions.append((start, before + j))
                start += count
        return pending

    def _turn(
        self, t: Trajectory, ids: list[int], logp: list[float], finish: str, room: int, limit: int
    ) -> list[Pending]:
        """Append one generated turn (or a piece of it); a Pending when it calls tools and
        may go on, or when the call's token `limit` (a piece's) cut it with room left
        (`more`)."""
        if len(ids) > room:  # past the trajectory's budget: cut, as a stop there would
            ids, logp, finish = ids[:room], logp[:room], "length"
        if t.turn_start < 0:
            t.turn_start = len(t.ids)
        t.ids += ids
        t.logprobs += logp
        t.mask += [1.0] * len(ids)
        if finish == "length" and len(ids) == limit < room:
            return [Pending(t, "", [], [], more=True)]
        ids, t.turn_start = t.ids[t.turn_start :], -1
        t.turns += 1
        stopped = finish == "stop"
        # an end-of-sequence stop closes the message (the template may write it itself); a
        # stop string (</tool_call>) is part of the message and the template closes it
        eos = stopped and ids[-1] not in self.stop_ids
        text = self.tokenizer.decode(ids[:-1] if eos else ids, skip_special_tokens=False)
        t.messages.append({"role": "assistant", "content": text})
        if not stopped:
            t.finish = "length"
            return []
        if self.turns is None:  # single turns
            t.finish = "stop"
            return []
        calls, errors = self.parse(text)
        if not calls and not errors:
            t.finish = "stop"
            return []
        t.tool_calls += len(calls) + len(errors)
        t.tool_errors += len(errors)
        if t.turns == self.config.max_turns:
            t.finish = "turns"
            return []
        return [Pending(t, self.tokenizer.decode(ids[-1:]) if eos else "", calls, errors)]

    def call(self, pending: list[Pending]) -> Coroutine[Any, Any, list[Result]]:
        """The calls of every one of `pending`, run at once, each with its budget."""
        c = self.config
        flat = [(call, p.trajectory.tools) for p in pending for call in p.calls]
        return gather_calls(flat, c.tool_timeout_s, c.max_tool_output_chars, c.tool_timeouts)

    def answer(self, pending: list[Pending]) -> list[Trajectory]:
        """Run every pending call at once, append the results; the trajectories that go on."""
        results = iter(asyncio.run(self.call(pending)) if pending else [])
        return [p.trajectory for p in pending if self.append(p, [next(results) for _ in p.calls])]

    def append(self, p: Pending, results: list[Result]) -> bool:
        """The results of `p`'s calls into its trajectory; whether it goes on."""
        t = p.trajectory
        if p.more:  # a turn cut at its piece's end: nothing to add
            return True
        texts = [f"error: {e}" for e in p.errors]
        for result in results:
            t.tool_errors += result.error is not None
            t.tool_timeouts += result.timed_out
            texts.append(result.text)
        messages = [{"role": "tool", "content": text} for text in texts]
        t.messages += messages
        delta = self.turns.tokens(messages, p.stop_text)
        if len(t.ids) + len(delta) >= self.config.max_total_tokens:  # no room to answer in
            t.finish = "length"
            return False
        t.ids += delta
        t.logprobs += [0.0] * len(delta)
        t.mask += [0.0] * len(delta)
        return True


def _generated(t: Trajectory) -> int:
    """The tokens of its turn generated so far (in pieces)."""
    return len(t.ids) - t.turn_start if t.turn_start >= 0 else 0


def stop_ids(tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> tuple[int, ...]:
    """The ids of every token whose text ends with one of `stops`."""
    if not stops:
        return ()
    vocab = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in vocab], skip_special_tokens=False)
    found = tuple(i for i, text in zip(vocab, texts, strict=True) if text.endswith(tuple(stops)))
    if not found:
        raise ValueError(f"rollout.agent.stop={stops}: no token of the tokenizer ends with it")
    return found


def row_tools(extra: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A dataset row's `tools` column (OpenAI function schemas, as a list or a JSON string;
    None when the row has none). ValueError says what is wrong with it."""
    value = extra.get("tools")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"'tools' is not valid JSON ({e.msg})") from e
    ok = isinstance(value, list) and all(
        isinstance(s, dict)
        and isinstance(s.get("function"), dict)
        and isinstance(s["function"].get("name"), str)
        for s in value
    )
    if not ok:
        raise ValueError("'tools' must be a list of {type: function, function: {name, ...}}")
    return value
